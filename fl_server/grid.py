"""Flower's grid with the sites' replies collected promptly.

Flower 1.41's deployment grid checks for replies every 3 s (``time.sleep(3)`` in its
``send_and_receive``), so a round whose replies are in after 0.6 s waits until 3 s, and one whose last
reply comes at 3.1 s waits until 6 s. :class:`PromptGrid` is the same grid (every call is Flower's own)
with ``send_and_receive`` asking every ``poll`` seconds instead. The SuperNodes' own 3 s poll of the
SuperLink is not ours to change: it stays the floor of a deployed round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["PromptGrid"]


class PromptGrid(Grid):
    """A Flower ``Grid`` that delegates to ``inner`` and polls for replies every ``poll`` seconds.

    Args:
        inner: The grid Flower gave the ServerApp.
        poll: Seconds between two requests for replies.
    """

    def __init__(self, inner: Grid, *, poll: float = 0.1) -> None:
        self.inner = inner
        self.poll = poll
        self._sent_to: dict[str, int] = {}  # message id -> the node it went to

    def set_run(self, run: Run) -> None:
        """Set the run the grid sends messages for (Flower's own call)."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The run the grid sends messages for."""
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message for node ``dst_node_id`` in this run (Flower's own call)."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The ids of the nodes connected now."""
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """The nodes connected now."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send ``messages``, remembering the node each went to (see :meth:`node_of`); returns their ids."""
        messages = list(messages)
        ids = list(self.inner.push_messages(messages))
        self._sent_to.update({i: int(m.metadata.dst_node_id) for i, m in zip(ids, messages, strict=False)})
        return ids

    def node_of(self, reply: Message) -> int:
        """The node a reply is about: the one its message went to (the SuperLink answers for a node that is
        gone with an error reply of its own, from its own node id), else the sender."""
        return self._sent_to.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived so far to the messages ``message_ids``."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and collect their replies until all are in or ``timeout`` seconds have passed."""
        waiting = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        replies: list[Message] = []
        while waiting:
            got = list(self.inner.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or time.monotonic() >= end:
                break
            time.sleep(self.poll)
        return replies
