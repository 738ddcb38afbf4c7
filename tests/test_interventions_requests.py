"""Per-request intervention specs: dict round trips, validation errors naming the item and field, files, and
per-row registration as a batching generator uses it."""

from __future__ import annotations

import pytest
import torch

from exllamav2.interventions import (InterventionRequestError, InterventionSpec, SteeringVectors, from_request,
                                     register_specs, wrapped_slots)

from test_interventions_models import generate, prompts, tiny_llama  # noqa: F401  (fixture)


def test_round_trip_and_defaults():
    s = InterventionSpec(point="blocks.1.resid_post", edit="add", vector=[0.5, 1.0], scale=2.0, positions="generated",
                         steps=[0, 1])
    d = s.to_dict()
    assert d == {"point": "blocks.1.resid_post", "edit": "add", "vector": [0.5, 1.0], "scale": 2.0,
                 "positions": "generated", "steps": [0, 1]}
    assert InterventionSpec.from_dict(d) == s
    import json
    assert InterventionSpec.from_dict(json.loads(json.dumps(d))) == s


@pytest.mark.parametrize("item,msg", [
    ({"edit": "add"}, r"interventions\[0\]: missing required field 'point'"),
    ({"point": "blocks.0.resid_pre", "edit": "add", "vector": [1.0] * 32, "colour": 1}, r"unknown field\(s\) \['colour'\]"),
    ({"point": "blocks.7.resid_pre", "edit": "zero"}, r"interventions\[0\]\.point: .*layer 7 does not exist"),
    ({"point": "blocks.0.resid_pre", "edit": "steer"}, r"\.edit: expected one of"),
    ({"point": "blocks.0.resid_pre", "edit": "add"}, r"\.vector: edit 'add' needs a vector or a file"),
    ({"point": "blocks.0.resid_pre", "edit": "add", "vector": [1.0, 2.0]}, r"\.vector: has 2 elements, point 'blocks.0.resid_pre' is 32 wide"),
    ({"point": "blocks.0.resid_pre", "edit": "add", "vector": ["x"] * 32}, r"\.vector: expected a non-empty list of finite numbers"),
    ({"point": "blocks.0.resid_pre", "edit": "zero", "vector": [1.0] * 32}, r"\.vector: edit 'zero' takes no vector"),
    ({"point": "blocks.0.resid_pre", "edit": "clamp"}, r"\.min: clamp needs min, max or both"),
    ({"point": "blocks.0.resid_pre", "edit": "scale", "scale": float("nan")}, r"\.scale: expected a finite number"),
    ({"point": "blocks.0.resid_pre", "edit": "zero", "positions": "late"}, r"positions: expected one of"),
    ({"point": "blocks.0.resid_pre", "edit": "zero", "rows": [-2]}, r"rows: expected non-negative ints"),
    ({"point": "blocks.0.resid_pre", "edit": "add", "file": "missing.safetensors"}, r"\.file: 'missing.safetensors' does not exist"),
    ("zero", r"interventions\[0\]: expected an object"),
])
def test_validation_errors(tiny_llama, item, msg):
    with pytest.raises(InterventionRequestError, match=msg):
        from_request(tiny_llama, [item])


def test_files_and_file_root(tiny_llama, tmp_path):
    v = torch.randn(32)
    SteeringVectors({1: v}, "resid_post", "tiny").save(str(tmp_path / "v.safetensors"))
    specs = from_request(tiny_llama, [{"point": "blocks.1.resid_post", "edit": "add", "file": "v.safetensors"}],
                         file_root=str(tmp_path))
    assert torch.equal(specs[0].load_vector(tiny_llama, file_root=str(tmp_path)), v)
    with pytest.raises(InterventionRequestError, match="holds layers \\[1\\], not the layer of 'blocks.2.resid_post'"):
        from_request(tiny_llama, [{"point": "blocks.2.resid_post", "edit": "add", "file": "v.safetensors"}],
                     file_root=str(tmp_path))
    with pytest.raises(InterventionRequestError, match="outside the allowed folder"):
        from_request(tiny_llama, [{"point": "blocks.1.resid_post", "edit": "add", "file": "../v.safetensors"}],
                     file_root=str(tmp_path / "sub"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InterventionRequestError, match=r"\.file: "):
        from_request(tiny_llama, [{"point": "blocks.1.resid_post", "edit": "add", "file": str(tmp_path / "junk.safetensors")}])


def test_register_specs_touch_only_the_jobs_row(tiny_llama):
    model = tiny_llama
    ids = prompts(model, 3, 6, seed=21)
    _, base = generate(model, ids, 4)
    req = [{"point": "blocks.1.resid_post", "edit": "add", "vector": (torch.randn(32) * 2).tolist(), "positions": "generated"},
           {"point": "blocks.0.mlp.pre_down", "edit": "scale", "scale": 1.5},
           {"point": "blocks.2.attn_out", "edit": "clamp", "min": -0.01, "max": 0.01},
           {"point": "blocks.1.resid_pre", "edit": "project_out", "vector": [1.0] + [0.0] * 31}]
    specs = from_request(model, req)
    job_row = {"row": 2}
    with register_specs(model, specs, rows=lambda: [job_row["row"]]) as group:
        assert len(group) == 4
        _, ed = generate(model, ids, 4)
    diff = (ed - base).abs().amax(-1)
    assert torch.equal(diff[:2], torch.zeros(2, 4)) and (diff[2] > 1e-4).all()
    assert not wrapped_slots(model)
