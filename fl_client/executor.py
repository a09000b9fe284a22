"""The site's executor: every message of a deployment runs in the oncofed that this site installed.

Flower's SuperNode receives each message from the SuperLink and holds it as a *task* on its local
runtime API (HTTP on 127.0.0.1). Left to itself, Flower starts ``flwr-clientapp`` per task, which
installs the app bundle (FAB) the lead's SuperLink sent and imports the ClientApp from it: the lead's
code would run on the hospital's data. ``oncofed-site join`` therefore starts the SuperNode with
``--isolation process`` and runs this executor in place of Flower's, which:

1. acquires each task on the runtime API, signed with a secret only ``join`` and this process know
   (``--superexec-auth-secret-file``: another local program cannot take the site's tasks);
2. pulls the task's message, context, run and bundle with the task's token (Flower's own client code);
3. checks the bundle's app id and version against this site's installed oncofed: a run built for
   another version gets a refusal the lead sees ("site a runs oncofed 0.2.0; this run was built with
   0.4.0"); the bundle's hash is recorded. Nothing of the bundle is installed, imported or executed;
4. forks a child from this warm process (torch, MONAI and oncofed are imported once, at start) and
   runs the site's installed ClientApp, :data:`fl_client.app.app`, in it; the child pushes the reply.
   One task's crash, leak or stray state dies with its child;
5. turns any failure into a failed reply with a reason code and a sentence (:mod:`fl_client.failures`;
   never the exception's text, which may hold a path), keeps the details in the site's error log and
   appends the failure to the egress log like any reply. A child killed outright (``kill -9``, out of
   memory) is answered by the parent the same way. The next task is served normally.

Run by ``join`` (see :class:`fl_client.join.SuperNode`); ``python -m fl_client.executor --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Message

from fl_client.failures import Failure, SiteFailure, checked, failure_of, record_failure
from models.config import RunKey
from models.protocol import FailureCode, NodeKey, Record, Refusal, RoundKey

__all__ = ["Executor", "installed_app", "main", "pull_task_input", "serve_task", "version_refusal", "warm_up"]

APP_ID = "oncofed/oncofed"  # [tool.flwr.app] publisher / [project] name
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
_REPLIED = b"R"


def installed_app() -> str:
    """``publisher/name==version`` of the oncofed installed at this site."""
    return f"{APP_ID}=={importlib.metadata.version('oncofed')}"


def _say(text: str) -> None:
    print(f"oncofed-executor: {text}", flush=True)


def _task_client(address: str, token: str, *, retry: bool = True) -> Any:
    """A runtime API client holding one task's token.

    Flower's retrying client answers an HTTP 401 (a token no longer valid) by sending SIGINT to its own
    process: right for a one-task ``flwr-clientapp``, fatal for the warm parent. The parent's heartbeat and
    its replies for a dead child therefore use a client without retries (``retry=False``).
    """
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker() if retry else None)


def _acquire_client(address: str, secret: bytes) -> Any:
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE})],
        retry_invoker=make_simple_http_retry_invoker())


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """The task's message, context, run and app bundle, pulled with the task's token.

    Flower's ``run_clientapp.pull_task_input`` with a short retry: the SuperNode offers a task before it
    has finished receiving the message's objects from the SuperLink, and Flower's first retry waits 1 s.
    """
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode offered a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.01, backoff_cap=0.05)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's own pull sets it
    return message, context, run, fab


def _site_of(context: Any) -> tuple[str, Path | None]:
    config = dict(context.node_config)
    workspace = config.get(NodeKey.WORKSPACE)
    return str(config.get(NodeKey.SITE_ID) or "?"), Path(str(workspace)) if workspace else None


def _error_reply(message: Any, context: Any, exc: BaseException | None, failure: Failure) -> Any:
    """The failed reply for ``message``; the failure is recorded at the site unless the handler already did (a
    :class:`fl_client.failures.SiteFailure`, or a refusal, logged as one by :func:`fl_client.federated.refusal`)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    from fl_client.federated import Refused

    site_id, workspace = _site_of(context)
    if not isinstance(exc, SiteFailure | Refused):  # those were recorded where they were raised
        config = (dict(message.content[Record.CONFIG]) if message.has_content() and Record.CONFIG in message.content
                  else {})
        record_failure(workspace, failure, run=str(config.get(RoundKey.RUN_ID) or message.metadata.run_id),
                       round_number=int(config.get(RoundKey.SERVER_ROUND, 0) or 0), exc=exc)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=failure.reason(site_id)),
                   reply_to=message)


def version_refusal(message: Any, context: Any, run: Any, fab_hash: str) -> Any | None:
    """A refusal reply if the run was built for another app or version than the installed one, else None."""
    from fl_client.app import refusal_message
    from fl_client.federated import site_from_config
    from fl_client.policy import RunBook, RunManifest

    built = f"{run.fab_id}=={run.fab_version}"
    mine = installed_app()
    if built == mine:
        return None
    site = site_from_config(dict(context.node_config), dict(context.run_config))
    if run.fab_id != APP_ID:
        detail = f"site {site.site_id} runs only {APP_ID}; this run was built from {run.fab_id[:60]}"
    else:
        detail = (f"site {site.site_id} runs oncofed {mine.split('==')[1]}; this run was built with "
                  f"{run.fab_version[:40]}")
    RunBook(site.workspace).refuse_unseen(str(run.run_id), RunManifest.foreign(str(run.run_id), built, fab_hash,
                                                                              dict(context.run_config)),
                                          code=Refusal.VERSION, detail=detail)
    return refusal_message(message, site, task=str(context.run_config.get(RunKey.TASK, "")), code=Refusal.VERSION,
                           detail=detail)


def serve_task(message: Any, context: Any, run: Any, fab: Any) -> Any:
    """The reply to one task, computed by the site's installed code (in the forked child)."""
    from fl_client.app import app
    refused = version_refusal(message, context, run, fab.hash_str)
    if refused is not None:
        return refused
    context.node_config[NodeKey.APP_BUNDLE] = f"{run.fab_id}=={run.fab_version}"
    context.node_config[NodeKey.APP_BUNDLE_SHA256] = fab.hash_str
    return app(message=message, context=context)


def _child(address: str, token: str, message: Any, context: Any, run: Any, fab: Any, pipe: int) -> int:
    """Run in the forked child: compute the reply, push it and the task's status; 0 if both went out."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    t0 = time.perf_counter()
    client = _task_client(address, token)
    status, details = SubStatus.COMPLETED, ""
    try:
        reply = serve_task(message, context, run, fab)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a PHI-free reply
        failure = failure_of(exc)
        site_id, _ = _site_of(context)
        status, details = SubStatus.FAILED, failure.reason(site_id)
        reply = _error_reply(message, context, exc, failure)
    t1 = time.perf_counter()
    push_message(client, reply, context)
    os.write(pipe, _REPLIED)
    t2 = time.perf_counter()
    push_task_output(client, context, status, details)
    client.close()
    os.write(pipe, f"compute {t1 - t0:.2f} s, reply {t2 - t1:.2f} s, status {time.perf_counter() - t2:.2f} s".encode())
    return 0


class Executor:
    """The warm parent: acquires tasks, forks a child per task, answers for children that die.

    Args:
        address: The SuperNode's runtime API (``127.0.0.1:PORT``).
        secret: The SuperExec secret shared with the SuperNode.
        supernode_pid: Exit when this process is gone (the SuperNode).
        poll: Seconds between two task requests when idle.
    """

    def __init__(self, address: str, secret: bytes, *, supernode_pid: int | None = None, poll: float = 0.1) -> None:
        self.address = address
        self.secret = secret
        self.supernode_pid = supernode_pid
        self.poll = poll
        self.child: int | None = None

    def supernode_alive(self) -> bool:
        """Whether the SuperNode is still running (always true when no ``supernode_pid`` was given)."""
        if self.supernode_pid is None:
            return True
        try:
            os.kill(self.supernode_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def run_forever(self) -> None:
        """Acquire and serve tasks one after another until the SuperNode is gone."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = _acquire_client(self.address, self.secret)
        _say(f"serving tasks with {installed_app()} (pid {os.getpid()})")
        while self.supernode_alive():
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                self.run_task(res.token, res.task.task_id)
            else:
                time.sleep(self.poll)
        _say("the SuperNode is gone; stopping")

    def run_task(self, token: str, task_id: int) -> None:
        """Serve one task: pull its input here, compute and reply in a forked child, answer if the child dies."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        t0 = time.perf_counter()
        client = _task_client(self.address, token)
        try:
            message, context, run, fab = pull_task_input(client)
        except Exception as exc:  # noqa: BLE001 - the SuperNode expires the task; the next one is served
            _say(f"task {task_id}: could not pull its input ({type(exc).__name__}); skipped")
            client.close()
            return
        kind = message.metadata.message_type
        pulled = time.perf_counter()
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.close(read)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = _child(self.address, token, message, context, run, fab, write)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.child = pid
        os.close(write)
        client.close()
        client = _task_client(self.address, token, retry=False)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        try:
            status = self._wait(pid)
        finally:
            self.child = None
            heartbeat.stop()
        said = b""
        while chunk := os.read(read, 4096):
            said += chunk
        os.close(read)
        replied = said.startswith(_REPLIED)
        if not replied:
            # The child died before its reply went out: answer for it.
            how = (f"signal {-status}" if status < 0 else f"exit code {status}")
            failure = checked(Failure(FailureCode.TASK_CRASHED, f"the site's task process ended abnormally "
                                                                f"({how}); the site's executor log has the details"))
            with contextlib.suppress(Exception):
                push_message(client, _error_reply(message, context, None, failure), context)
            with contextlib.suppress(Exception):
                push_task_output(client, context, SubStatus.FAILED, failure.reason(_site_of(context)[0]))
            _say(f"task {task_id} ({kind}, run {run.run_id}): the task process died ({how}); failed reply sent")
        else:
            _say(f"task {task_id} ({kind}, run {run.run_id}): done in {time.perf_counter() - t0:.2f} s "
                 f"(input pulled in {pulled - t0:.2f} s; process {pid}: {said[1:].decode(errors='replace')})")
        client.close()

    def _wait(self, pid: int) -> int:
        """Wait for the child; its exit code, or minus the signal that killed it."""
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if not self.supernode_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def stop(self, *_: Any) -> None:
        """Kill the task process in progress, if any, and exit; installed as the SIGTERM and SIGINT handler.

        Raises:
            SystemExit: Always, with status 0.
        """
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        raise SystemExit(0)


def warm_up(say: Callable[[str], None] = _say) -> float:
    """Import what every task needs, once; returns the seconds it took."""
    t0 = time.perf_counter()
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import monai  # noqa: F401
    import torch  # noqa: F401

    # torch imports these on the first optimizer step (about 1.2 s, sympy included): once here, not per task.
    import torch._dynamo  # noqa: F401
    import torch._inductor  # noqa: F401
    import torch.onnx  # noqa: F401

    import fl_client.app  # noqa: F401
    import fl_client.federated  # noqa: F401
    import fl_client.train  # noqa: F401

    seconds = time.perf_counter() - t0
    say(f"warm: torch, MONAI and oncofed imported in {seconds:.1f} s")
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Run the executor from the command line (``python -m fl_client.executor``) until the SuperNode is gone.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fl_client.executor", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The site's executor for a SuperNode started with --isolation process (oncofed-site join "
                    "starts it; you do not need to).",
        epilog="example:\n  python -m fl_client.executor --runtime-api 127.0.0.1:9094 "
               "--secret-file ws/supernode/superexec.secret")
    parser.add_argument("--runtime-api", required=True, metavar="HOST:PORT", help="the SuperNode's runtime API")
    parser.add_argument("--secret-file", type=Path, required=True, help="the SuperExec secret shared with it")
    parser.add_argument("--supernode-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between task requests when idle")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    warm_up()
    executor = Executor(args.runtime_api, args.secret_file.read_bytes(), supernode_pid=args.supernode_pid,
                        poll=args.poll)
    signal.signal(signal.SIGTERM, executor.stop)
    signal.signal(signal.SIGINT, executor.stop)
    executor.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
