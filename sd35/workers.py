"""Worker processes that score the CPU-bound rewards of sd35/pixel_rewards.py beside the trainer.

Each is a fresh `python -m sd35.workers TRAINER_PID NAME...` importing numpy, PIL and the OCR
engine, never torch or the trainer, that reads JSON headers and raw uint8 pixels from its stdin
and writes JSON replies to its stdout (length-prefixed messages, no pickle). It ignores SIGINT and
SIGTERM, which a terminal or a scheduler sends to the whole process group: the trainer decides
when to stop, and closes its stdin. The kernel kills it when the trainer dies (PR_SET_PDEATHSIG).
"""
import ctypes
import ctypes.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # where `-m sd35.workers` is found
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerError(RuntimeError):
    """A worker could not score a task: its reward raised (the message says why), or it died."""


class ScoringWorkers:
    """`count` workers scoring the pixel rewards `names`: `submit` queues a batch and returns a
    Future of its scores, which a thread per worker completes, one task at a time. Once a worker
    has died, every task fails with the same WorkerError."""

    def __init__(self, names, count):
        self.tasks, self.failure = queue.SimpleQueue(), None
        # The signal mask survives fork and exec: a worker starts with these signals blocked and
        # ignores them before unblocking them, so none ends it early. Blocked in this thread only,
        # they still reach the trainer, whose handlers Python runs in the main thread. The
        # parent-death signal follows the thread that starts a worker: construct in the main one.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.processes = [subprocess.Popen([sys.executable, "-m", "sd35.workers", str(os.getpid()), *names],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
                              for _ in range(count)]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.threads = [threading.Thread(target=self._feed, args=(p,), daemon=True) for p in self.processes]
        for thread in self.threads:
            thread.start()

    def submit(self, name, pixels, prompts, metadata):
        """Score uint8 pixels [B, H, W, 3] with reward `name` -> a Future of B floats."""
        future = Future()
        header = {"name": name, "prompts": prompts, "metadata": metadata, "shape": pixels.shape}
        self.tasks.put((future, json.dumps(header).encode(), pixels.tobytes()))
        return future

    def _feed(self, process):
        """Hand `process` one task at a time until close() queues None, then end it."""
        to_worker, from_worker = (Connection(os.dup(pipe.fileno())) for pipe in (process.stdin, process.stdout))
        process.stdin.close()  # the Connections hold the pipes now
        process.stdout.close()
        while (task := self.tasks.get()) is not None:
            future, header, pixels = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if self.failure:  # since a worker died, every task fails: the run stops rather than slows
                    raise EOFError
                to_worker.send_bytes(header)
                to_worker.send_bytes(pixels)
                reply = json.loads(from_worker.recv_bytes())
            except (OSError, EOFError):
                self.failure = self.failure or f"a scoring worker process died (exit code {process.wait()})"
                reply = {"error": self.failure}
            if "error" in reply:
                future.set_exception(WorkerError(reply["error"]))
            else:
                future.set_result(reply["scores"])
        to_worker.close()  # the worker reads end of file and exits
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # stuck in a library call
            process.kill()
            process.wait()

    def close(self):
        """Cancel the queued tasks, let each worker finish the one it has, and end the workers."""
        try:
            while True:
                self.tasks.get_nowait()[0].cancel()
        except queue.Empty:
            pass
        for _ in self.threads:
            self.tasks.put(None)
        for thread in self.threads:
            thread.join()


def keep_freed_memory():
    """Make glibc keep large freed blocks for reuse: the OCR engine turns ONNX Runtime's arena off,
    so each detection allocates its feature maps afresh, from new pages the kernel must zero-fill.
    The peak memory is unchanged. Without glibc there is no mallopt and this does nothing."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(m_mmap_threshold, 256 << 20)  # large enough for the detector's feature maps
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError, TypeError):
        pass


def serve(trainer, names):
    """A worker's life: score each request from stdin, reply on the original stdout, until end of file."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:  # Linux; elsewhere the end of file that follows the trainer's death must do
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != trainer:  # it died before the line above
        return
    inbox, replies = Connection(0, writable=False), Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a library's print goes to stderr, not into the replies
    keep_freed_memory()
    from sd35.pixel_rewards import PIXEL_REWARDS  # once the trainer is watched: it takes a moment
    rewards = {name: PIXEL_REWARDS[name](1) for name in names}  # one thread each: the workers are the parallelism
    while True:
        try:
            header, payload = json.loads(inbox.recv_bytes()), inbox.recv_bytes()
        except EOFError:
            return
        pixels = np.frombuffer(payload, np.uint8).reshape(header["shape"])
        try:
            reply = {"scores": [float(s) for s in rewards[header["name"]](pixels, header["prompts"],
                                                                            header["metadata"])]}
        except Exception as error:  # noqa: BLE001 - the trainer names the reward and the prompt
            reply = {"error": str(error) or type(error).__name__}
        replies.send_bytes(json.dumps(reply).encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])
