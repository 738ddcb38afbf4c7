"""Async front of the dynamic generator: the generator loop runs in a background thread; each job is an async
iterator over its result dicts, fed through its event loop."""

from __future__ import annotations

import asyncio
import threading

from .dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob

__all__ = ["ExLlamaV2DynamicGeneratorAsync", "ExLlamaV2DynamicJobAsync"]

_DONE = object()


class ExLlamaV2DynamicGeneratorAsync:
    """`ExLlamaV2DynamicGeneratorAsync(generator)` or `ExLlamaV2DynamicGeneratorAsync(model, cache, tokenizer,
    ...)` (the arguments of ExLlamaV2DynamicGenerator)."""

    def __init__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], ExLlamaV2DynamicGenerator):
            self.generator = args[0]
        else:
            self.generator = ExLlamaV2DynamicGenerator(*args, **kwargs)
        self.lock = threading.Lock()  # guards the inbox only; never held during a step
        self.wakeup = threading.Condition(self.lock)
        self.inbox: list[tuple[str, ExLlamaV2DynamicJobAsync]] = []
        self.jobs: dict[ExLlamaV2DynamicJob, ExLlamaV2DynamicJobAsync] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="exllamav2-dynamic-generator", daemon=True)
        self.thread.start()

    def _apply_inbox(self) -> None:
        gen = self.generator
        for action, ajob in self.inbox:
            if action == "enqueue":
                try:
                    gen.enqueue(ajob.job)
                    self.jobs[ajob.job] = ajob
                except Exception as e:
                    ajob._push(e)
            else:
                gen.cancel(ajob.job)
                if self.jobs.pop(ajob.job, None) is not None:
                    ajob._push(_DONE)
        self.inbox.clear()

    def _run(self) -> None:
        gen = self.generator
        while True:
            with self.wakeup:
                while not self.closed and not self.inbox and not gen.num_remaining_jobs():
                    self.wakeup.wait()
                if self.closed:
                    gen.clear_queue()
                    return
                self._apply_inbox()
            if not gen.num_remaining_jobs():
                continue
            try:
                results = gen.iterate()
            except Exception as e:  # a failed step ends the jobs it ran, not the loop
                # the generator cancels a job whose sampling failed and keeps the others' results for the next
                # step (dynamic.py): end the jobs it dropped; a failure of the whole step ends every job it ran
                live = set(gen.active) | set(gen.pending)
                dropped = [job for job in self.jobs if job not in live]
                if not dropped:
                    dropped = list(gen.active)
                    for job in dropped:
                        gen.cancel(job)
                for job in dropped:
                    ajob = self.jobs.pop(job, None)
                    if ajob is not None:
                        ajob._push(e)
                continue
            for r in results:
                ajob = self.jobs.get(r["job"])
                if ajob is not None:
                    ajob._push(r)
                    if r.get("eos"):
                        self.jobs.pop(r["job"], None)
                        ajob._push(_DONE)

    def enqueue(self, ajob: "ExLlamaV2DynamicJobAsync") -> None:
        """Checks the job (ValueError if it can never run), then hands it to the generator thread."""
        self.generator.validate(ajob.job)
        with self.wakeup:
            if self.closed:
                raise RuntimeError("the generator is closed")
            self.inbox.append(("enqueue", ajob))
            self.wakeup.notify()

    def cancel(self, ajob: "ExLlamaV2DynamicJobAsync") -> None:
        """Cancellation happens between steps; the job's iterator ends at once."""
        with self.wakeup:
            self.inbox.append(("cancel", ajob))
            self.wakeup.notify()
        ajob._push(_DONE)

    def num_pending_jobs(self) -> int:
        return self.generator.num_pending_jobs() + sum(1 for a, _ in self.inbox if a == "enqueue")

    def num_remaining_jobs(self) -> int:
        return self.generator.num_remaining_jobs() + sum(1 for a, _ in self.inbox if a == "enqueue")

    def close_sync(self, timeout: float | None = None) -> None:
        with self.wakeup:
            self.closed = True
            for ajob in list(self.jobs.values()):
                ajob._push(_DONE)
            self.wakeup.notify()
        self.thread.join(timeout)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)


class ExLlamaV2DynamicJobAsync:
    """`ExLlamaV2DynamicJobAsync(generator_async, *job_args, **job_kwargs)`: enqueues at once; `async for` yields
    the job's result dicts up to the one with `eos`; `await cancel()` stops it and frees its pages."""

    def __init__(self, generator: ExLlamaV2DynamicGeneratorAsync, *args, **kwargs):
        self.generator = generator
        self.job = ExLlamaV2DynamicJob(*args, **kwargs)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        generator.enqueue(self)

    def _push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the job's event loop is gone
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        item = await self.queue.get()
        if item is _DONE:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    async def cancel(self) -> None:
        self.cancelled = True
        self.generator.cancel(self)
