"""Interventions on a running model: named points, edits (steering, ablation, patching), capture, steering
vectors and per-request specs. Built on `exllamav2.module.Intervention`; see README_SECTION.md."""

from .capture import Capture, CaptureResult, add_capture
from .edits import EDIT_KINDS, AddVector, Clamp, Edit, ProjectOut, Replace, Scale, Zero
from .hooks import (EditHandle, Handle, InterventionGroup, InterventionHook, add_edit, intervene, model_state,
                    token_streams, wrapped_slots)
from .points import BLOCK_POINTS, UnknownPointError, point_names, resolve
from .requests import InterventionRequestError, InterventionSpec, from_request, register_specs
from .steering import SteeringVectors, contrastive_steering, last_token_activations
from .targets import CallInfo, Selection, Target, TokenStreams

__all__ = [
    "Capture", "CaptureResult", "add_capture", "EDIT_KINDS", "AddVector", "Clamp", "Edit", "ProjectOut", "Replace",
    "Scale", "Zero", "EditHandle", "Handle", "InterventionGroup", "InterventionHook", "add_edit", "intervene",
    "model_state", "token_streams", "wrapped_slots", "BLOCK_POINTS", "UnknownPointError", "point_names", "resolve",
    "InterventionRequestError", "InterventionSpec", "from_request", "register_specs", "SteeringVectors",
    "contrastive_steering", "last_token_activations", "CallInfo", "Selection", "Target", "TokenStreams",
]
