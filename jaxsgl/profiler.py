"""Device and host traces of a running engine, as SGLang's `/start_profile` and `/stop_profile`
take them: one JAX profiler trace at a time for the whole process, started on request and
stopped on request or after a number of engine steps.

A trace is a folder that TensorBoard's profile plugin and Perfetto read
(`<dir>/plugins/profile/<run>/*.xplane.pb` and `perfetto_trace.json.gz`);
`benchmarks/trace_summary.py <dir>` sums a device's time by kernel kind from it.
"""

from __future__ import annotations

import logging
import os
import threading

import jax

logger = logging.getLogger(__name__)

DEFAULT_DIR_ENV = "JAXSGL_PROFILER_DIR"  # where traces go when a request names no folder


def default_dir() -> str:
    """The traces' folder when none is named: $JAXSGL_PROFILER_DIR, else /tmp/jaxsgl_profile."""
    return os.environ.get(DEFAULT_DIR_ENV, "/tmp/jaxsgl_profile")


class TraceSession:
    """The process's one trace: `start`, then `stop` or `num_steps` calls of `after_step`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.output_dir: str | None = None  # the running trace's folder
        self._steps_left: int | None = None

    @property
    def running(self) -> bool:
        return self.output_dir is not None

    def start(self, output_dir: str | None = None, num_steps: int | None = None) -> str:
        """Start tracing into `output_dir` (default: $JAXSGL_PROFILER_DIR or
        /tmp/jaxsgl_profile); with `num_steps`, the trace stops itself after that many engine
        steps. Returns the folder. ValueError if a trace is running or an argument is bad."""
        if num_steps is not None and (
            isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if output_dir is not None and not isinstance(output_dir, str):
            raise ValueError(f"output_dir must be a string, got {output_dir!r}")
        folder = output_dir or default_dir()
        with self._lock:
            if self.running:
                raise ValueError(f"a trace is already running (into {self.output_dir})")
            os.makedirs(folder, exist_ok=True)
            jax.profiler.start_trace(folder, create_perfetto_trace=True)
            self.output_dir, self._steps_left = folder, num_steps
        logger.info("trace started into %s (%s steps)", folder, num_steps or "until stopped")
        return folder

    def stop(self) -> str:
        """Stop the running trace and write it; returns its folder. ValueError if none runs."""
        with self._lock:
            if not self.running:
                raise ValueError("no trace is running")
            return self._stop()

    def after_step(self) -> None:
        """An engine step ran: count it against the trace's `num_steps`."""
        if self._steps_left is None:  # no trace, or one until stopped: nothing to count
            return
        with self._lock:
            if self._steps_left is None:
                return
            self._steps_left -= 1
            if self._steps_left <= 0:
                self._stop()

    def _stop(self) -> str:
        folder, self.output_dir, self._steps_left = self.output_dir, None, None
        jax.profiler.stop_trace()
        logger.info("trace written to %s", folder)
        return folder


TRACE = TraceSession()  # JAX's profiler is one per process, and so is this
