"""Chat-completion chunks as Responses stream events, and a whole chat completion as a Response object.

One translator serves both: a whole completion is fed in as a single chunk, so the object a plain
request gets is exactly the ``response.completed`` one a stream ends with. Events follow OpenAI's
documented order, each with a ``sequence_number``:

    response.created, response.in_progress,
    per text item: output_item.added, content_part.added, output_text.delta*, output_text.done,
                   content_part.done, output_item.done
    per call:      output_item.added, function_call_arguments.delta*, function_call_arguments.done,
                   output_item.done
    response.completed (or response.incomplete when max_output_tokens cut it short; response.failed
    after an ``error`` event)

Tool calls arrive as chat's ``delta.tool_calls``: ``{index, id, type, function: {name}}`` first, then
``{index, function: {arguments: "<fragment>"}}``.
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


def _text_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` entries in the Responses shape (the same fields, renamed nowhere)."""
    return [
        {
            "token": entry["token"],
            "bytes": entry.get("bytes") or [],
            "logprob": entry["logprob"],
            "top_logprobs": [
                {"token": top["token"], "bytes": top.get("bytes") or [], "logprob": top["logprob"]}
                for top in entry.get("top_logprobs") or []
            ],
        }
        for entry in entries
    ]


class _Message:
    def __init__(self, output_index: int) -> None:
        self.id = new_id("msg")
        self.output_index = output_index
        self.text = ""
        self.logprobs: list[dict[str, Any]] = []

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}

    def item(self, status: str) -> dict[str, Any]:
        content = [self.part()] if status != "in_progress" else []
        return {"id": self.id, "type": "message", "role": "assistant", "status": status, "content": content}


class _Call:
    def __init__(self, output_index: int, call_id: str, name: str) -> None:
        self.id = new_id("fc")
        self.output_index = output_index
        self.call_id = call_id
        self.name = name
        self.arguments = ""

    def item(self, status: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function_call",
            "status": status,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
        }


class ResponseTranslator:
    """Feed chat chunks in order; each call returns the Responses events they become."""

    def __init__(self, skeleton: dict[str, Any]) -> None:
        self.response = skeleton
        self._sequence = 0
        self._items: list[dict[str, Any]] = []
        self._message: _Message | None = None
        self._calls: dict[int, _Call] = {}
        self._open_call: _Call | None = None
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.response)

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # the Responses API has one output; the chat body never asks for n > 1
            delta = choice.get("delta") or {}
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            if delta.get("content") or logprobs:
                events += self._text(delta.get("content") or "", _text_logprobs(logprobs))
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def _text(self, text: str, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events = self._close_call()
        if self._message is None:
            self._message = _Message(len(self._items))
            self._items.append({})
            events += self._open_message(self._message)
        message = self._message
        message.text += text
        message.logprobs += logprobs
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=message.id,
                output_index=message.output_index,
                content_index=0,
                delta=text,
                logprobs=[{k: v for k, v in lp.items() if k != "bytes"} for lp in logprobs],
            )
        )
        return events

    def _open_message(self, message: _Message) -> list[dict[str, Any]]:
        return [
            self._event(
                "response.output_item.added",
                output_index=message.output_index,
                item=message.item("in_progress"),
            ),
            self._event(
                "response.content_part.added",
                item_id=message.id,
                output_index=message.output_index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        message = self._message
        if message is None:
            return []
        self._message = None
        item = message.item(status)
        self._items[message.output_index] = item
        return [
            self._event(
                "response.output_text.done",
                item_id=message.id,
                output_index=message.output_index,
                content_index=0,
                text=message.text,
                logprobs=[{k: v for k, v in lp.items() if k != "bytes"} for lp in message.logprobs],
            ),
            self._event(
                "response.content_part.done",
                item_id=message.id,
                output_index=message.output_index,
                content_index=0,
                part=message.part(),
            ),
            self._event("response.output_item.done", output_index=message.output_index, item=item),
        ]

    def _tool_call(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        index = int(delta.get("index", 0))
        function = delta.get("function") or {}
        events: list[dict[str, Any]] = []
        call = self._calls.get(index)
        if call is None:
            events += self._close_message("completed")
            events += self._close_call()
            call = _Call(len(self._items), delta.get("id") or new_id("call"), function.get("name") or "")
            self._calls[index] = call
            self._open_call = call
            self._items.append({})
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=call.output_index,
                    item=call.item("in_progress"),
                )
            )
        fragment = function.get("arguments") or ""
        if fragment:
            call.arguments += fragment
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=call.id,
                    output_index=call.output_index,
                    delta=fragment,
                )
            )
        return events

    def _close_call(self, status: str = "completed") -> list[dict[str, Any]]:
        call = self._open_call
        if call is None:
            return []
        self._open_call = None
        item = call.item(status)
        self._items[call.output_index] = item
        return [
            self._event(
                "response.function_call_arguments.done",
                item_id=call.id,
                output_index=call.output_index,
                arguments=call.arguments,
            ),
            self._event("response.output_item.done", output_index=call.output_index, item=item),
        ]

    def finish(self) -> list[dict[str, Any]]:
        """Close what is open; the last event carries the whole response."""
        incomplete = self._finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        events: list[dict[str, Any]] = []
        if not self._items:  # nothing came out: still one (empty) message, as OpenAI answers
            self._message = _Message(0)
            self._items.append({})
            events += self._open_message(self._message)
        events += self._close_message(status)
        events += self._close_call(status)
        self.response.update(
            status=status,
            output=list(self._items),
            usage=usage(self._usage),
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            completed_at=None if incomplete else int(time.time()),
        )
        kind = "response.incomplete" if incomplete else "response.completed"
        events.append(self._event(kind, response=self._snapshot()))
        return events

    def fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """An error after the stream started: an ``error`` event, then ``response.failed``."""
        self.response.update(
            status="failed",
            output=[item for item in self._items if item],
            error={"code": error.get("code") or "server_error", "message": error.get("message", "")},
        )
        return [
            self._event(
                "error", code=error.get("code"), message=error.get("message", ""), param=error.get("param")
            ),
            self._event("response.failed", response=self._snapshot()),
        ]


def completion_as_chunk(completion: dict[str, Any]) -> dict[str, Any]:
    """A whole chat completion as one chunk (``delta.tool_calls`` with indexes), for the translator."""
    chunk: dict[str, Any] = {"choices": [], "usage": completion.get("usage")}
    for choice in completion.get("choices") or []:
        message = choice.get("message") or {}
        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or [])]
        delta: dict[str, Any] = {"content": message.get("content") or ""}
        if calls:
            delta["tool_calls"] = calls
        chunk["choices"].append(
            {
                "index": choice.get("index", 0),
                "delta": delta,
                "logprobs": choice.get("logprobs"),
                "finish_reason": choice.get("finish_reason"),
            }
        )
    return chunk
