"""The in-process engine with its nodes in worker processes, one per core.

A node's work (reading and checking its extract, building designs, the local fits, the
disclosure checks, the audit log) is mostly Python holding CPython's lock, so nodes in threads
of one process barely run at the same time. Here each node lives in one of a few worker
processes forked from the coordinator's process (which has already imported everything, so a
worker starts in milliseconds): a message goes to its node's worker as Flower's wire bytes and
the reply comes back the same way, exactly as the thread grid and the deployed network carry
them. A node always answers from the same worker, which keeps its loaded data, its state and
its audit log and release memory to itself.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

from flwr.app import Message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

from ...protocol.errors import IaptnetError
from .inprocess import InProcessGrid, _blas_controller


def _to_bytes(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def _from_bytes(data: bytes) -> Message:
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def _data_size(node: dict) -> int:
    """The size of a node's extract on disk, to share the work out; 0 for a database."""
    try:
        return Path(str(node.get("data", ""))).stat().st_size
    except (OSError, ValueError):
        return 0


def assign_workers(nodes: dict[int, dict], workers: int) -> dict[int, int]:
    """node id -> worker: the largest extracts first, each to the least loaded worker, so
    that log-normal service sizes still split the work evenly."""
    load = [0] * workers
    owner = {}
    for node_id in sorted(nodes, key=lambda n: (-_data_size(nodes[n]), n)):
        worker = load.index(min(load))
        owner[node_id] = worker
        load[worker] += max(_data_size(nodes[node_id]), 1)
    return owner


class NodeProcessGrid(InProcessGrid):
    """An `InProcessGrid` whose nodes answer in `workers` forked processes.

    Close it (or use it as a context manager) to stop the workers; they also stop with this
    process, as daemons.
    """

    def __init__(self, node_configs: list[dict], workers: int, client_app=None, run_config: dict | None = None):
        super().__init__(node_configs, client_app=client_app, run_config=run_config)
        workers = max(1, min(workers, len(self._nodes)))
        self._owner = assign_workers(self._nodes, workers)
        context = multiprocessing.get_context("fork")
        self._pipes, self._processes = [], []
        for worker in range(workers):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=self._serve, args=(child_end, parent_end), name=f"iaptnet-nodes-{worker}", daemon=True
            )
            process.start()
            child_end.close()
            self._pipes.append(parent_end)
            self._processes.append(process)

    def _serve(self, pipe, own_parent_end) -> None:
        """A worker's loop: a batch of (message id, wire bytes) in, the replies' bytes out.
        It closes its copies of the coordinator's ends, so that it sees the end of its pipe
        (and stops) when the coordinator closes it or dies."""
        own_parent_end.close()
        for other in self._pipes:
            other.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C and stops us
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - never write to the analyst's terminal
        with _blas_controller().limit(limits=1, user_api="blas"):
            while True:
                try:
                    batch = pipe.recv()
                except (EOFError, OSError):
                    return  # the coordinator closed the pipe, or stopped
                replies = []
                for msg_id, data in batch:
                    incoming = _from_bytes(data)
                    incoming.metadata.__dict__["_message_id"] = msg_id
                    replies.append(_to_bytes(self._answer(incoming)))
                try:
                    pipe.send(replies)
                except OSError:
                    return  # the coordinator stopped (Ctrl-C, an error) while we worked

    def push_messages(self, messages) -> list[str]:
        batches: list[list] = [[] for _ in self._pipes]
        ids = []
        for msg in messages:
            msg_id = self._new_id(msg)
            node_id = msg.metadata.dst_node_id
            if node_id in self._nodes:
                batches[self._owner[node_id]].append((msg_id, _to_bytes(msg)))
                ids.append(msg_id)
        busy = [w for w, batch in enumerate(batches) if batch]
        for worker in busy:
            try:
                self._pipes[worker].send(batches[worker])
            except OSError:  # it died before it could hear the round
                raise self._stopped(worker) from None
        for worker in busy:
            try:
                replies = self._pipes[worker].recv()
            except (EOFError, OSError):
                raise self._stopped(worker) from None
            for (msg_id, _), data in zip(batches[worker], replies):
                self._replies[msg_id] = _from_bytes(data)
        return ids

    def _stopped(self, worker: int) -> IaptnetError:
        """The error for a worker that died; its exit code is read once the process is reaped
        (the pipe closes a moment before the operating system reports the exit)."""
        process = self._processes[worker]
        process.join(timeout=5)
        return IaptnetError(
            f"a worker process of the in-process engine stopped (exit code {process.exitcode}); "
            "if the machine ran out of memory, run with fewer workers (--workers)."
        )

    def close(self) -> None:
        """Stop the workers: an idle one sees its pipe close and ends; one still working (the
        run was interrupted) is stopped after 2 s, which its node survives as it survives a
        crash (the audit log and release memory are crash-safe)."""
        for pipe in self._pipes:
            pipe.close()
        for process in self._processes:
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join()
        self._pipes, self._processes = [], []

    def __enter__(self) -> NodeProcessGrid:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
