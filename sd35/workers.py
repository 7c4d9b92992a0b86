"""Worker processes that score the CPU-bound rewards of sd35/pixel_rewards.py beside the trainer.

Each worker is a fresh Python running this file (`python -m sd35.workers TRAINER_PID NAME...`):
it imports numpy, PIL and the OCR engine, never torch or the trainer, and speaks over its stdin
and stdout in messages of two little-endian uint32 lengths, a JSON header and raw uint8 pixels
(no pickle). A thread of the trainer per worker feeds it one task at a time from a shared queue
and completes the task's Future. A worker ignores SIGINT and SIGTERM, which a terminal or a
scheduler sends to the whole process group: the trainer decides when to stop, and closes its
stdin. It ends when the trainer dies at any moment, start-up included: the kernel kills it with
the trainer (PR_SET_PDEATHSIG), and it ends at once if the trainer was gone before that was set.
"""
import ctypes
import ctypes.util
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # where `-m sd35.workers` is found
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerError(RuntimeError):
    """A worker could not score a task: its reward raised (the message says why), or it died."""


def default_worker_count(cores=None, local_ranks=None):
    """Workers per rank: this machine's cores shared among the ranks on it (torchrun's
    LOCAL_WORLD_SIZE), at least one."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, cores // (local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def send(stream, header, payload=b""):
    data = json.dumps(header).encode()
    stream.write(struct.pack("<II", len(data), len(payload)))
    stream.write(data)
    stream.write(payload)
    stream.flush()


def receive(stream):
    """The next (header, payload), or None at end of file (the other side is gone)."""
    lengths = stream.read(8)
    if len(lengths) < 8:
        return None
    header_length, payload_length = struct.unpack("<II", lengths)
    data = stream.read(header_length + payload_length)
    if len(data) < header_length + payload_length:
        return None
    return json.loads(data[:header_length]), data[header_length:]


class ScoringWorkers:
    """`count` worker processes scoring the pixel rewards `names`; `submit` returns a Future of
    one batch's scores. Once a worker has died, every task fails with the same WorkerError."""

    def __init__(self, names, count):
        self.tasks, self.failure = queue.SimpleQueue(), None
        command = [sys.executable, "-m", "sd35.workers", str(os.getpid()), *names]
        # The signal mask survives fork and exec: each worker starts with these signals blocked and
        # ignores them before it unblocks them, so none can end it early. Blocked in this thread
        # only, they still reach the trainer (Python runs its handlers in the main thread). The
        # kernel's parent-death signal follows the thread that starts a worker: the main one.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.processes = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
                              for _ in range(count)]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.threads = [threading.Thread(target=self._feed, args=(process,), daemon=True)
                        for process in self.processes]
        for thread in self.threads:
            thread.start()

    def submit(self, name, pixels, prompts, metadata):
        """Score uint8 pixels [B, H, W, 3] with reward `name` -> a Future of B floats."""
        future = Future()
        self.tasks.put((future, {"name": name, "prompts": prompts, "metadata": metadata,
                                 "shape": pixels.shape}, pixels.tobytes()))
        return future

    def _feed(self, process):
        """Hand `process` one task at a time until close() queues None; then close its stdin."""
        while (task := self.tasks.get()) is not None:
            future, header, payload = task
            if not future.set_running_or_notify_cancel():
                continue
            reply = None
            if self.failure is None:
                try:
                    send(process.stdin, header, payload)
                    reply = receive(process.stdout)
                except OSError:  # a broken pipe: the worker is gone
                    pass
            if reply is None:
                self.failure = self.failure or f"a scoring worker process died (exit code {process.wait()})"
                future.set_exception(WorkerError(self.failure))
            elif "error" in reply[0]:
                future.set_exception(WorkerError(reply[0]["error"]))
            else:
                future.set_result(reply[0]["scores"])
        process.stdin.close()  # the worker reads end of file and exits
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
    """A worker's life: score each request from stdin onto the original stdout until end of file."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:  # Linux: SIGKILL when the trainer dies from now on; elsewhere end of file must do
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != trainer:  # it died before the line above
        return
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library's print goes to stderr, not into the replies
    keep_freed_memory()
    from sd35.pixel_rewards import PIXEL_REWARDS  # after the watch on the trainer: it takes a moment
    rewards = {name: PIXEL_REWARDS[name](1) for name in names}  # one thread each: the workers are the parallelism
    while (request := receive(sys.stdin.buffer)) is not None:
        header, payload = request
        pixels = np.frombuffer(payload, np.uint8).reshape(header["shape"])
        try:
            reply = {"scores": [float(s) for s in rewards[header["name"]](pixels, header["prompts"],
                                                                            header["metadata"])]}
        except Exception as error:  # noqa: BLE001 - the trainer names the reward and the prompt
            reply = {"error": str(error) or type(error).__name__}
        send(replies, reply)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])
