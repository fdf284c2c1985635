"""Tests for claude_max_proxy.py, in the order of its sections.

Pure sections get table tests. The HTTP tests run the proxy in-process, in two
layers: fast ones drive it with a fake `claude` (FAKE_CLAUDE below, modelled on
the CLI's recorded transcripts); integration ones run the real Claude Code CLI
(installed by `make test` into .cache/claude) against FakeAnthropic, a Messages
API on 127.0.0.1 whose request log shows exactly what would reach the model.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import claude_max_proxy as cmp
from claude_max_proxy import (ApiError, ClaudeProcess, Config, TextDelta, ThinkingSignature, Turn, TurnEnd,
                              TurnStart, TurnTranslator, Usage)

HERE = Path(__file__).resolve().parent
REAL_CLI = HERE / ".cache" / "claude" / "node_modules" / ".bin" / "claude"
USER = {"role": "user", "content": "hi"}


# ── the fake Anthropic API ──────────────────────────────────────────────────

def sse_event(event: dict) -> bytes:
    data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer(text="Hello from fake upstream.", pieces=None, thinking=None, stop_reason="end_turn",
           usage=None, hold_after=None):
    """A normal reply. With hold_after=N the stream pauses after N pieces until release is set."""
    pieces = pieces or [text]
    usage = usage or {"input_tokens": 10, "output_tokens": 5,
                      "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}

    def respond(handler, body):
        if not body.get("stream"):  # the CLI's non-streaming fallback
            content = [{"type": "thinking", "thinking": thinking, "signature": "c2ln"}] if thinking else []
            return handler.send_json(200, {
                "id": "msg_fallback", "type": "message", "role": "assistant", "model": body["model"],
                "content": content + [{"type": "text", "text": "".join(pieces)}],
                "stop_reason": stop_reason, "stop_sequence": None, "usage": usage})
        handler.start_stream()
        handler.event({"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1)}})
        index = 0
        if thinking:
            handler.event({"type": "content_block_start", "index": 0,
                           "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
            handler.event({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "thinking_delta", "thinking": thinking}})
            handler.event({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "signature_delta", "signature": "c2ln"}})
            handler.event({"type": "content_block_stop", "index": 0})
            index = 1
        handler.event({"type": "content_block_start", "index": index,
                       "content_block": {"type": "text", "text": ""}})
        for number, piece in enumerate(pieces):
            if number == hold_after:
                handler.server.release.wait(30)
            handler.event({"type": "content_block_delta", "index": index,
                           "delta": {"type": "text_delta", "text": piece}})
        handler.event({"type": "content_block_stop", "index": index})
        handler.event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                       "usage": {"output_tokens": usage["output_tokens"]}})
        handler.event({"type": "message_stop"})
        handler.wfile.write(b"0\r\n\r\n")
        handler.server.finished.set()
    return respond


def tool_use(*calls, text=None, pause=0.0, thinking=None):
    """Claude calling tools: each call is (id, name, input), after `thinking` and `text` if
    given. `pause` seconds pass between calls, as with a model still writing the next one.
    Each message has an id of its own, as Anthropic's do: the CLI merges messages that share one."""
    def respond(handler, body, ending=True):
        handler.start_stream()
        handler.event({"type": "message_start", "message": {
            "id": f"msg_{calls[0][0]}", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}})
        blocks = ([("thinking", thinking)] if thinking else []) + ([("text", text)] if text else []) + \
            [("tool_use", call) for call in calls]
        for index, (kind, value) in enumerate(blocks):
            if kind == "thinking":
                handler.event({"type": "content_block_start", "index": index,
                               "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
                handler.event({"type": "content_block_delta", "index": index,
                               "delta": {"type": "thinking_delta", "thinking": value}})
                handler.event({"type": "content_block_delta", "index": index,
                               "delta": {"type": "signature_delta", "signature": "c2lnbmVk"}})
            elif kind == "text":
                handler.event({"type": "content_block_start", "index": index,
                               "content_block": {"type": "text", "text": ""}})
                handler.event({"type": "content_block_delta", "index": index,
                               "delta": {"type": "text_delta", "text": value}})
            else:
                if index and pause:
                    time.sleep(pause)
                call_id, name, tool_input = value
                handler.event({"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": call_id, "name": name, "input": {}}})
                arguments = json.dumps(tool_input)
                for start in range(0, len(arguments), 4):
                    handler.event({"type": "content_block_delta", "index": index, "delta": {
                        "type": "input_json_delta", "partial_json": arguments[start:start + 4]}})
            handler.event({"type": "content_block_stop", "index": index})
        if ending:
            handler.event({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"output_tokens": 20}})
            handler.event({"type": "message_stop"})
            handler.wfile.write(b"0\r\n\r\n")
    return respond


def tool_use_then_drop(handler, body):
    """One whole call; half a second later, the connection breaks."""
    tool_use(("toolu_kept", "get_time", {}))(handler, body, ending=False)
    time.sleep(0.5)  # (broken at once, the CLI drops the whole message and asks again)
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def fail(status, error_type, message, headers=()):
    def respond(handler, body):
        handler.send_json(status, {"type": "error", "error": {"type": error_type, "message": message}},
                          headers)
    return respond


def drop(pieces):
    """Start streaming; once release is set, break the connection mid-answer."""
    def respond(handler, body):
        handler.start_stream()
        handler.event({"type": "message_start", "message": {
            "id": "msg_dropped", "type": "message", "role": "assistant", "model": body["model"],
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1}}})
        handler.event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        for piece in pieces:
            handler.event({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": piece}})
        handler.server.release.wait(30)
        handler.server.release.clear()  # the retry that follows must not wait
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
    return respond


def stall(handler, body):
    """Begin a stream, then say nothing until release is set."""
    handler.start_stream()
    handler.event({"type": "message_start", "message": {
        "id": "msg_stall", "type": "message", "role": "assistant", "model": body["model"], "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}})
    handler.server.release.wait(30)
    handler.close_connection = True


class FakeAnthropic(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeAnthropicHandler)
        self.posts = []        # {"headers": {...}, "body": {...}} for each POST /v1/messages
        self.script = []       # responders for the next POSTs; then `default`
        self.default = answer()
        self.posted = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.hung_up = threading.Event()  # the CLI closed the connection before the reply ended
        self.headers = {}      # sent on every answer: Anthropic's rate-limit headers, say
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def last(self) -> dict:
        return self.posts[-1]["body"]


class FakeAnthropicHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in [("content-type", "application/json"), ("content-length", str(len(data))),
                            *self.server.headers.items(), *headers]:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self):
        self.send_response(200)
        for name, value in [("content-type", "text/event-stream"), ("transfer-encoding", "chunked"),
                            *self.server.headers.items()]:
            self.send_header(name, value)
        self.end_headers()

    def event(self, event):
        self.wfile.write(sse_event(event))

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.posts.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        self.server.posted.set()
        respond = self.server.script.pop(0) if self.server.script else self.server.default
        try:
            respond(self, body)
        except (BrokenPipeError, ConnectionResetError):
            self.server.hung_up.set()  # what an interrupt looks like from here


def texts(text: str) -> list:
    """A tool result's content as the proxy sends it: a list of one text block."""
    return [{"type": "text", "text": text}]


def without_cache_marks(block: dict) -> dict:
    """A content block without the prompt-cache mark the CLI puts on the latest one."""
    return {key: value for key, value in block.items() if key != "cache_control"}


def user_texts(body: dict) -> list:
    """The text of each user message the upstream got, without the CLI's reminders."""
    texts = []
    for message in body["messages"]:
        if message["role"] != "user":
            continue
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        texts.append([b.get("text") for b in blocks
                      if b["type"] == "text" and not b["text"].startswith("<system-reminder>")])
    return texts


# ── the proxy under test and its client ─────────────────────────────────────

class Response:
    def __init__(self, status, headers, text):
        self.status, self.headers, self.text = status, headers, text

    def json(self):
        return json.loads(self.text)

    @property
    def error(self) -> dict:
        body = self.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]


class Client:
    def __init__(self, server):
        self.server = server
        self.port = server.server_address[1]

    def connect(self, timeout=20):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def call(self, method, path, body=None, headers=None, raw=None):
        conn = self.connect()
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        text = reply.read().decode()
        conn.close()
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, text)

    def chat(self, headers=None, **body):
        body.setdefault("model", "claude-sonnet-4")
        body.setdefault("messages", [USER])
        return self.call("POST", "/v1/chat/completions", body, headers)

    def post_streaming(self, path, body, headers=None) -> tuple:
        """POST body with stream: true; the connection and its response, unread."""
        body = {"model": "claude-sonnet-4", **body, "stream": True}
        conn = self.connect()
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json", **(headers or {})})
        return conn, conn.getresponse()

    def open_stream(self, headers=None, **body):
        """Send a streaming request; return the response and a lazy iterator of SSE frames."""
        body.setdefault("messages", [USER])
        conn, reply = self.post_streaming("/v1/chat/completions", body, headers)

        def frames():
            for line in iter(reply.readline, b""):
                line = line.decode().rstrip("\n")
                if line.startswith(": "):
                    yield line
                elif line.startswith("data: "):
                    data = line[len("data: "):]
                    yield data if data == "[DONE]" else json.loads(data)
            conn.close()
        return reply, frames()

    def stream(self, **body):
        reply, frames = self.open_stream(**body)
        return reply, list(frames)

    def respond(self, **body):
        """POST /v1/responses, without streaming."""
        body.setdefault("model", "claude-sonnet-4")
        body.setdefault("input", "hi")
        return self.call("POST", "/v1/responses", body)

    def respond_streaming(self, **body) -> tuple:
        """POST /v1/responses with stream: the response and its (event name, data) pairs."""
        body.setdefault("input", "hi")
        return self.named_events("/v1/responses", body)

    def named_events(self, path, body, headers=None) -> tuple:
        """POST a streamed request: the response and its (event name, data) pairs."""
        conn, reply = self.post_streaming(path, body, headers)
        events, name = [], None
        for line in iter(reply.readline, b""):
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                name = None
        conn.close()
        return reply, events


def text_and_finish(client: Client, stream: bool, **body) -> tuple:
    """The reply's text and finish_reason, streamed or not."""
    if not stream:
        choice = client.chat(**body).json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    frames = client.stream(**body)[1]
    return content_of(frames), [f["choices"][0]["finish_reason"] for f in frames if isinstance(f, dict)][-1]


def content_of(frames) -> str:
    return "".join(f["choices"][0]["delta"].get("content") or "" for f in frames
                   if isinstance(f, dict) and f.get("choices"))


def wait_until(condition, timeout=5.0, step=0.02):
    """Poll for a condition that has no event to wait on (a child process exiting)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(step)
    return True


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
            return stat.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, also while we read
        return False


@pytest.fixture(scope="session")
def real_cli():
    if not os.access(REAL_CLI, os.X_OK):
        pytest.fail(f"the Claude Code CLI is not installed at {REAL_CLI}; run `make test`")
    return str(REAL_CLI)


@pytest.fixture
def upstream(tmp_path, monkeypatch):
    """The fake API, and an environment that sends every CLI there and nowhere else."""
    fake = FakeAnthropic()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "test")
    monkeypatch.setenv("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_MODEL"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.release.set()
    fake.shutdown()
    fake.server_close()


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.drain_and_close()


def serve(servers: list, **options) -> Client:
    server = cmp.ProxyServer(Config(port=0, **options), "2.1.329")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    servers.append(server)
    return Client(server)


@pytest.fixture
def start_real_proxy(upstream, real_cli, servers):
    yield lambda **options: serve(servers, **{"claude": real_cli, **options})
    upstream.release.set()  # before the servers stop, so none waits out its grace period


@pytest.fixture
def real_client(start_real_proxy):
    return start_real_proxy()


# The fake `claude`: it speaks stream-json like the real CLI 2.1.329 (its lines
# are modelled on ../shared/claude-cli/fixtures), plays the scenario named in
# the file FAKE_CLAUDE_SCENARIO, and appends what it receives to FAKE_CLAUDE_LOG.
# It reads the scenario at each user line, not once at its start: a process
# started ahead of a request (or kept from an earlier one) plays what the test
# running now asks for.
FAKE_CLAUDE = r'''
import json, os, sys, time

if "--version" in sys.argv:
    print("2.1.329 (Claude Code)")
    sys.exit(0)
SCENARIO = None  # read at each user line
received = []
waiting = []  # lines read ahead while the tool server connected
TOOLS = []  # what the proxy's tool server listed


def log(entry):
    with open(os.environ["FAKE_CLAUDE_LOG"], "a") as f:
        f.write(json.dumps(dict(entry, pid=os.getpid())) + "\n")


def emit(line):
    text = json.dumps(line) + "\n"
    if os.environ.get("FAKE_CLAUDE_SPLIT_LINES"):  # each line in two writes, as a long line can come
        sys.stdout.write(text[:len(text) // 2])
        sys.stdout.flush()
        time.sleep(0.01)
        text = text[len(text) // 2:]
    sys.stdout.write(text)
    sys.stdout.flush()


def event(e, **extra):
    emit({"type": "stream_event", "event": e, "session_id": "s", **extra})


def message_start(usage=None, init=True):
    """Claude's next message; the first of a turn comes after the turn's init line."""
    names = [tool["name"] for tool in TOOLS]
    if SCENARIO == "drops_tools":  # as the real CLI does with a schema it rejects
        names = names[:-1]
    if init:
        emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "tools": names, "model": "claude-sonnet-5-5"})
    event({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
           "content": [], "usage": usage or {"input_tokens": 10, "output_tokens": 1}}})


def block(kind="text", index=0):
    event({"type": "content_block_start", "index": index, "content_block": {"type": kind, kind: ""}})


def deltas(*texts, kind="text", index=0):
    for text in texts:
        event({"type": "content_block_delta", "index": index, "delta": {"type": kind + "_delta", kind: text}})


def end(stop_reason="end_turn", output_tokens=5):
    event({"type": "content_block_stop", "index": 0})
    event({"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": output_tokens}})
    event({"type": "message_stop"})


def result(text, usage=None):
    emit({"type": "result", "subtype": "success", "is_error": False, "result": text, "stop_reason": "end_turn",
          "terminal_reason": "completed", "num_turns": 1,
          "usage": usage or {"input_tokens": 10, "output_tokens": 5, "output_tokens_details": {"thinking_tokens": 0}}})


def api_error(message, error, status=None, terminal="api_error"):
    emit({"type": "assistant", "message": {"id": "synthetic", "model": "<synthetic>", "role": "assistant",
          "content": [{"type": "text", "text": message}]}, "error": error, "is_api_error_message": True})
    emit({"type": "result", "subtype": "success", "is_error": True, "result": message, "api_error_status": status,
          "terminal_reason": terminal, "stop_reason": "stop_sequence", "usage": {"input_tokens": 0, "output_tokens": 0}})


def dropped(*texts):
    message_start()
    block()
    deltas(*texts)
    event({"type": "content_block_stop", "index": 0})
    event({"type": "message_stop"}, abandoned_blocks={"api_message_id": "msg_fake", "from_block_index": 0})


def next_line():
    return waiting.pop(0) if waiting else read_line()


def read_line():
    line = sys.stdin.readline()
    if line:
        received.append(json.loads(line))
        log({"stdin": received[-1]})
    return received[-1] if line else None


def interrupted():
    """Read stdin until the proxy's interrupt (True) or its end (False)."""
    while True:
        line = next_line()
        if line is None:
            return False
        if line.get("type") == "control_request" and line["request"]["subtype"] == "interrupt":
            emit({"type": "control_response", "response": {"subtype": "success", "request_id": line["request_id"],
                  "response": {"still_queued": []}}})
            emit({"type": "user", "message": {"role": "user", "content": [
                {"type": "text", "text": "[Request interrupted by user]"}]}})
            event({"type": "message_delta", "delta": {"stop_reason": None}})
            event({"type": "message_stop"}, abandoned_blocks={"api_message_id": "msg_fake", "from_block_index": 1})
            emit({"type": "result", "subtype": "error_during_execution", "is_error": True,
                  "terminal_reason": "aborted_streaming", "usage": {"input_tokens": 0, "output_tokens": 0}})
            return True


def connect_tool_server():
    """The CLI's MCP handshake with an sdk server (PROTOCOL.md §8.3)."""
    for request_id, message in (
            ("mcp-1", {"method": "initialize", "params": {"protocolVersion": "2025-11-25"}, "jsonrpc": "2.0", "id": 0}),
            ("mcp-2", {"method": "notifications/initialized", "jsonrpc": "2.0"}),
            ("mcp-3", {"method": "tools/list", "jsonrpc": "2.0", "id": 1})):
        emit({"type": "control_request", "request_id": request_id,
              "request": {"subtype": "mcp_message", "server_name": "client", "message": message}})
        while True:  # the proxy does not wait for the handshake to send the prompt
            reply = read_line()
            if reply["type"] == "control_response" and reply["response"]["request_id"] == request_id:
                break
            waiting.append(reply)
    TOOLS[:] = reply["response"]["response"]["mcp_response"]["result"]["tools"]


def tool_block(index, call_id, name, *pieces):
    event({"type": "content_block_start", "index": index,
           "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}})
    for piece in pieces:
        event({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}})
    event({"type": "content_block_stop", "index": index})


def ask_permission(call_id, name, tool_input):
    emit({"type": "control_request", "request_id": "perm-" + call_id, "request": {
        "subtype": "can_use_tool", "tool_name": name, "input": tool_input, "tool_use_id": call_id}})


def answered_early():
    """Whether the proxy answers while Claude is still writing; the real CLI then cuts the message short."""
    import select
    return bool(select.select([sys.stdin], [], [], 0.5)[0])


def await_reply(prefix):
    """The proxy's answer to our control request whose id starts with `prefix` (None at the end of stdin)."""
    while True:
        line = next_line()
        if line is None or line["type"] == "control_response" and line["response"]["request_id"].startswith(prefix):
            return line and line["response"].get("response")


def await_permission_reply():
    return await_reply("perm-")


def run_calls(calls):
    """Run Claude's calls one at a time, as the real CLI runs the client's tools.

    It asks to run each (the first was asked while Claude wrote it), runs an
    allowed one through the tool server, and tells Claude a refused one did
    not run. False if the proxy refused a run and ended the turn.
    """
    for number, (call_id, name, tool_input) in enumerate(calls):
        if number:
            ask_permission(call_id, name, tool_input)
        reply = await_permission_reply()
        if reply is None or reply["behavior"] == "deny" and reply["interrupt"]:
            return False
        if reply["behavior"] == "allow":
            emit({"type": "control_request", "request_id": "call-" + call_id, "request": {
                "subtype": "mcp_message", "server_name": "client", "message": {
                    "method": "tools/call", "jsonrpc": "2.0", "id": 10 + number, "params": {
                        "name": name, "arguments": reply["updatedInput"],
                        "_meta": {"claudecode/toolUseId": call_id}}}}})
            content = await_reply("call-" + call_id)["mcp_response"]["result"]["content"]
        else:
            content = reply["message"]
        log({"ran": call_id, "content": content})
        emit({"type": "user", "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call_id, "content": content}]}})
    return True


def answered(text, usage):
    """Claude's answer after the tool results, in the same turn; `usage` counts the whole turn."""
    message_start({"input_tokens": 20, "output_tokens": 1}, init=False)
    block()
    deltas(text)
    end(output_tokens=5)
    result(text, usage)


def refused(output_tokens=20):
    emit({"type": "user", "message": {"role": "user", "content": [
        {"type": "text", "text": "[Request interrupted by user for tool use]"}]}})
    emit({"type": "result", "subtype": "error_during_execution", "is_error": True, "stop_reason": "tool_use",
          "terminal_reason": "aborted_tools", "usage": {"input_tokens": 10, "output_tokens": output_tokens}})


def wait_for_release():
    while not os.path.exists(os.environ["FAKE_CLAUDE_RELEASE"]):
        time.sleep(0.01)


def answer():
    if SCENARIO == "text":
        usage = {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 100,
                 "cache_creation_input_tokens": 20, "output_tokens_details": {"thinking_tokens": 0}}
        message_start(usage)
        block()
        deltas("Hello ", "world")
        end(output_tokens=3)
        result("Hello world", usage)
    elif SCENARIO == "thinking":
        message_start()
        block("thinking")
        deltas("Let me think. ", kind="thinking")
        event({"type": "content_block_stop", "index": 0})
        block(index=1)
        deltas("Hel", "lo", index=1)
        end()
        result("Hello")
    elif SCENARIO == "echo":  # answer with what the CLI was given
        text = json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "cwd_files": os.listdir("."),
                           "env": dict(os.environ), "stdin": received})
        message_start()
        block()
        deltas(text)
        end()
        result(text)
    elif SCENARIO == "hold":  # silent until the test releases it
        message_start()
        block()
        wait_for_release()
        deltas("late")
        end()
        result("late")
    elif SCENARIO == "token_then_hang":
        message_start()
        block()
        deltas("first")
        while next_line() is not None:
            pass
    elif SCENARIO == "call_then_hang":  # in the middle of writing a tool call's arguments
        message_start()
        event({"type": "content_block_start", "index": 0,
               "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}})
        event({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}})
        while next_line() is not None:
            pass
    elif SCENARIO == "flood":  # an answer without end, for a client that does not read it
        message_start()
        block()
        while True:
            deltas("x" * 60000)
    elif SCENARIO == "hang":  # never answers
        message_start()
        while next_line() is not None:
            pass
    elif SCENARIO == "stop":
        message_start()
        block()
        deltas("one ", "two ", "STOP")
        if not interrupted():
            deltas(" three")
            end()
            result("one two STOP three")
    elif SCENARIO == "max_tokens":  # the CLI goes on with a "continue" call unless interrupted
        message_start()
        block()
        deltas("trun", "cated")
        end("max_tokens")
        if not interrupted():
            dropped("truncated again")
            api_error("API Error: Claude's response exceeded the 3 output token maximum.", "max_output_tokens")
    elif SCENARIO == "drop_then_same":
        dropped("Hello ")
        message_start()
        block()
        deltas("Hello ", "world")
        end()
        result("Hello world")
    elif SCENARIO == "drop_then_different":  # the retry is the CLI's non-streaming fallback
        dropped("Partial ")
        emit({"type": "assistant", "message": {"id": "msg_2", "model": "claude-sonnet-5-5", "role": "assistant",
              "content": [{"type": "text", "text": "Something else"}]}})
        result("Something else")
    elif SCENARIO == "garbage":
        print("Segmentation fault?", flush=True)
    elif SCENARIO == "helper":  # starts a process of its own (as tools would), then hangs
        import subprocess
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        log({"helper": helper.pid})
        message_start()
        while next_line() is not None:
            pass
    elif SCENARIO == "tool_calls":  # text, then two calls, arguments split at awkward places
        message_start()
        block()
        deltas("Let me check.")
        event({"type": "content_block_stop", "index": 0})
        tool_block(1, "toolu_1", "get_weather", '{"ci', 'ty": "Z\\u00', 'fcrich"', "}")
        ask_permission("toolu_1", "get_weather", {"city": "Z\u00fcrich"})
        if answered_early():
            log({"answered_early": True})
            return refused(output_tokens=8)
        tool_block(2, "toolu_2", "get_time")
        event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}})
        event({"type": "message_stop"})
        if run_calls([("toolu_1", "get_weather", {"city": "Z\u00fcrich"}), ("toolu_2", "get_time", {})]):
            answered("Sunny at noon.", {"input_tokens": 30, "output_tokens": 25})
        else:
            refused()
    elif SCENARIO.startswith("tool_loop"):  # an agent's loop: "tool_loop N" calls a tool N times, then answers
        steps = int(SCENARIO.split()[1])
        for step in range(steps):
            message_start(init=step == 0)
            tool_block(0, f"toolu_s{step}", "get_weather", '{"city": "Oslo"}')
            ask_permission(f"toolu_s{step}", "get_weather", {"city": "Oslo"})
            event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}})
            event({"type": "message_stop"})
            if not run_calls([(f"toolu_s{step}", "get_weather", {"city": "Oslo"})]):
                return refused()
        answered("Done.", {"input_tokens": 10 * steps + 20, "output_tokens": 20 * steps + 5})
    elif SCENARIO == "tool_call_unstreamed":  # the CLI's non-streaming fallback
        emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "tools": [t["name"] for t in TOOLS]})
        ask_permission("toolu_0", "Bash", {"command": "rm -rf ~"})  # not a client tool: must never run
        await_permission_reply()
        emit({"type": "assistant", "message": {"id": "msg_2", "model": "claude-sonnet-5-5", "role": "assistant",
              "content": [{"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}}]}})
        ask_permission("toolu_9", "get_weather", {"city": "Oslo"})
        await_permission_reply()
        refused()
    elif SCENARIO == "structured":  # the CLI's StructuredOutput tool, checked and accepted
        message_start()
        block()
        deltas("Here it is.")
        event({"type": "content_block_stop", "index": 0})
        tool_block(1, "toolu_s", "StructuredOutput", '{"name": ', '"Alice"}')
        event({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}})
        event({"type": "message_stop"})
        emit({"type": "user", "message": {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_s",
              "content": "Structured output provided successfully"}]}})
        emit({"type": "result", "subtype": "success", "is_error": False, "stop_reason": "tool_use",
              "terminal_reason": "completed", "result": '{"name":"Alice"}', "structured_output": {"name": "Alice"},
              "usage": {"input_tokens": 10, "output_tokens": 9}})
    elif SCENARIO == "drops_tools":
        message_start()
        while next_line() is not None:
            pass
    elif SCENARIO == "rate_limit":
        emit({"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": time.time() + 120}})
        api_error("API Error: Request rejected (429) · slow down", "rate_limit", 429)
    else:
        api_error(*ERRORS[SCENARIO])


ERRORS = {  # as in fixtures/errors/*.stdout.jsonl and 50, 56
    "not_logged_in": ("Not logged in · Please run /login", "authentication_failed"),
    "invalid_login": ("Invalid API key · Fix external API key", "authentication_failed", 401),
    "overloaded": ("API Error: Repeated 529 Overloaded errors.", "server_error", 529),
    "prompt_too_long": ("Prompt is too long", "invalid_request", None, "blocking_limit"),
    "request_too_large": ("Request too large (max 32MB).", "invalid_request", 413, "image_error"),
    "model_not_found": ("There's an issue with the selected model (claude-nope).", "model_not_found", 404),
    "bad_request": ("API Error: 400 messages: text content blocks must be non-empty", "unknown", 400),
    "forbidden": ("Failed to authenticate. API Error: 403 no permission", "authentication_failed", 403),
    "server_error": ("API Error: 500 Internal server error.", "server_error", 500),
}

log({"argv": sys.argv[1:], "max_tokens": os.environ.get("CLAUDE_CODE_MAX_OUTPUT_TOKENS")})
if "--permission-prompt-tool=stdio" in sys.argv:  # as the real CLI, it asks for its tools at its start
    connect_tool_server()
while True:
    line = next_line()
    if line is None:
        break
    if line["type"] == "control_request":
        emit({"type": "control_response", "response": {"subtype": "success", "request_id": line["request_id"],
              "response": {}}})
    elif line["type"] == "user" and line.get("shouldQuery") is False:
        emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "tools": [t["name"] for t in TOOLS]})
        log({"emitted": "history result"})
        emit({"type": "result", "subtype": "success", "is_error": False, "result": "", "num_turns": 0,
              "stop_reason": None, "usage": {"input_tokens": 0, "output_tokens": 0}})
    elif line["type"] == "user":
        with open(os.environ["FAKE_CLAUDE_SCENARIO"]) as scenario:
            SCENARIO = scenario.read()
        if SCENARIO == "crash":
            sys.stderr.write("fatal: out of cheese\n")
            sys.exit(3)
        answer()
log({"eof": True})  # stdin closed: the proxy let it finish on its own
'''


class FakeClaude:
    """The fake `claude` of the fast tests, and what it saw."""

    def __init__(self, path, tmp_path, monkeypatch):
        self.path = path
        self.log_path = tmp_path / "fake-claude.log"
        self.release_path = tmp_path / "fake-claude.release"
        self.scenario_path = tmp_path / "fake-claude.scenario"
        monkeypatch.setenv("FAKE_CLAUDE_LOG", str(self.log_path))
        monkeypatch.setenv("FAKE_CLAUDE_RELEASE", str(self.release_path))
        monkeypatch.setenv("FAKE_CLAUDE_SCENARIO", str(self.scenario_path))
        self.play("text")

    def play(self, scenario):
        self.scenario_path.write_text(scenario)

    def release(self):
        self.release_path.touch()

    def log(self) -> list:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def stdin(self) -> list:
        return [entry["stdin"] for entry in self.log() if "stdin" in entry]


@pytest.fixture(scope="session")
def fake_claude_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bin") / "claude"
    path.write_text(f"#!{sys.executable}\n{FAKE_CLAUDE}")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake(fake_claude_path, tmp_path, monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return FakeClaude(fake_claude_path, tmp_path, monkeypatch)


@pytest.fixture
def start_proxy(fake, servers):
    yield lambda **options: serve(servers, **{"claude": fake.path, **options})
    fake.release()  # before the servers stop, so none waits out its grace period


@pytest.fixture
def client(start_proxy):
    return start_proxy()


def sent(stdin: list) -> list:
    """What the proxy wrote to a CLI of its own accord: its answers to the CLI's tool server
    handshake, which the CLI begins as it starts, may come before the session does."""
    return [line for line in stdin if line.get("type") != "control_response"]


def echo(reply: Response) -> dict:
    """What the fake CLI was given, from its `echo` answer."""
    assert reply.status == 200, reply.text
    return json.loads(reply.json()["choices"][0]["message"]["content"])


# ── 1. Configuration ────────────────────────────────────────────────────────

def test_options_fall_back_to_environment_variables():
    config = cmp.parse_config([], {"CLAUDE_MAX_PROXY_PORT": "8080", "CLAUDE_MAX_PROXY_API_KEY": "k",
                                   "CLAUDE_MAX_PROXY_CORS_ORIGINS": "http://a, http://b",
                                   "CLAUDE_MAX_PROXY_USE_API_KEY": "1", "CLAUDE_MAX_PROXY_TIMEOUT": "30",
                                   "CLAUDE_MAX_PROXY_ALLOW_EXTRA_USAGE": "yes"})
    assert (config.port, config.api_key, config.cors_origins, config.use_api_key, config.timeout,
            config.allow_extra_usage) == (8080, "k", ("http://a", "http://b"), True, 30.0, True)
    assert cmp.parse_config(["--allow-extra-usage"], {}).allow_extra_usage
    assert not cmp.parse_config([], {}).allow_extra_usage


def test_command_line_beats_environment():
    config = cmp.parse_config(["--port", "9000", "--cors-origin", "http://c", "--max-concurrency", "2"],
                              {"CLAUDE_MAX_PROXY_PORT": "8080", "CLAUDE_MAX_PROXY_CORS_ORIGINS": "http://a"})
    assert (config.port, config.cors_origins, config.max_concurrency) == (9000, ("http://c",), 2)


def test_defaults_listen_on_loopback_3456_with_bounded_retries():
    config = cmp.parse_config([], {})
    assert (config.host, config.port, config.claude, config.max_retries) == ("127.0.0.1", 3456, "claude", 2)


def test_a_relative_cli_path_is_made_absolute_and_a_name_is_left_to_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cmp.parse_config(["--claude", "bin/claude"], {}).claude == str(tmp_path / "bin" / "claude")
    assert cmp.parse_config(["--claude", "claude"], {}).claude == "claude"


def test_every_option_is_in_help_and_readme(capsys):
    with pytest.raises(SystemExit):
        cmp.parse_config(["--help"], {})
    help_text = capsys.readouterr().out
    readme = (HERE / "README.md").read_text()
    options = set(re.findall(r"^  (--[a-z-]+)", help_text, re.MULTILINE)) - {"--help"}
    assert {"--host", "--max-processes", "--spares", "--conversation-timeout", "--version"} <= options
    for option in options:
        assert f"`{option}" in readme, f"{option} is not documented in README.md"
    variables = set(re.findall(r"\$(CLAUDE_MAX_PROXY_[A-Z_]+)", help_text))
    assert len(variables) == len(options) - 1  # all but --version
    for variable in variables:
        assert f"`{variable}" in readme, f"{variable} is not documented in README.md"


def test_version_option(capsys):
    with pytest.raises(SystemExit):
        cmp.parse_config(["--version"], {})
    assert capsys.readouterr().out.strip() == f"claude-max-proxy {cmp.__version__}"


# ── 3. Models ───────────────────────────────────────────────────────────────

@pytest.mark.parametrize("requested, cli_model", [
    ("claude-opus-4", "opus"), ("claude-sonnet-4", "sonnet"), ("claude-haiku-4", "haiku"),
    ("opus", "opus"), ("sonnet", "sonnet"), ("haiku", "haiku"),
    ("openai/claude-opus-4", "opus"), ("claude-max/claude-sonnet-4", "sonnet"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929"), ("claude-3-5-haiku-20241022",
                                                                    "claude-3-5-haiku-20241022"),
    ("claude-sonnet-4-5[1m]", "claude-sonnet-4-5[1m]"),
])
def test_resolve_model(requested, cli_model):
    assert cmp.resolve_model(requested) == cli_model


@pytest.mark.parametrize("requested", ["gpt-4o", "claude", "claude-", "openai/gpt-4", "claude-opus-4 --tools=Bash"])
def test_unknown_model_is_404_listing_valid_ids(requested):
    with pytest.raises(ApiError) as caught:
        cmp.resolve_model(requested)
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")
    assert "claude-opus-4, claude-sonnet-4, claude-haiku-4, opus, sonnet, haiku" in caught.value.message


# ── 4. The OpenAI request ───────────────────────────────────────────────────

def parse(**body):
    body.setdefault("model", "claude-sonnet-4")
    body.setdefault("messages", [USER])
    return cmp.parse_chat_request(body)


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({"messages": [USER]}, "model"),
    ({"model": "", "messages": [USER]}, "model"),
    ({"model": "claude-sonnet-4"}, "messages"),
    ({"model": "claude-sonnet-4", "messages": []}, "messages"),
    ({"model": "claude-sonnet-4", "messages": "hi"}, "messages"),
    ({"model": "claude-sonnet-4", "messages": ["hi"]}, "messages[0]"),
    ({"model": "claude-sonnet-4", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "claude-sonnet-4", "messages": [USER, {"role": "tool", "content": "42"}]},
     "messages[1].tool_call_id"),
    ({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, "messages[0].content[0]"),
    ({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"model": "claude-sonnet-4", "messages": [USER, {"role": "assistant", "content": "prefill"}]}, "messages"),
    ({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"model": "claude-sonnet-4", "messages": [USER], "n": 2}, "n"),
    ({"model": "claude-sonnet-4", "messages": [USER], "temperature": 2.5}, "temperature"),
    ({"model": "claude-sonnet-4", "messages": [USER], "temperature": "hot"}, "temperature"),
    ({"model": "claude-sonnet-4", "messages": [USER], "stream": "yes"}, "stream"),
    ({"model": "claude-sonnet-4", "messages": [USER], "max_tokens": 0}, "max_tokens"),
    ({"model": "claude-sonnet-4", "messages": [USER], "max_completion_tokens": True}, "max_completion_tokens"),
    ({"model": "claude-sonnet-4", "messages": [USER], "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"model": "claude-sonnet-4", "messages": [USER], "stop": ["a", 5]}, "stop"),
    ({"model": "claude-sonnet-4", "messages": [USER], "stop": [f"s{n}" for n in range(65)]}, "stop"),
    ({"model": "claude-sonnet-4", "messages": [USER], "stop": ["x" * 1001]}, "stop"),
    ({"model": "claude-sonnet-4", "messages": [USER], "stop": [""]}, "stop"),
    ({"model": "claude-sonnet-4", "messages": [USER], "logprobs": True}, "logprobs"),
])
def test_parse_chat_request_rejects_with_a_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as caught:
        cmp.parse_chat_request(body)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert caught.value.error_type == "invalid_request_error"


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,@@@", "no valid base64"),
    ("data:image/png;base64,", "no valid base64"),
    ("data:application/pdf;base64,AAAA", "application/pdf"),
    ("ftp://example.com/cat.png", "http(s) URL or a base64 data URL"),
])
def test_bad_image_urls_are_400s(url, message):
    with pytest.raises(ApiError) as caught:
        parse(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    assert caught.value.status == 400 and message in caught.value.message


def test_fields_real_clients_send_are_accepted_and_ignored():
    request = parse(store=False, stream=True, stream_options={"include_usage": True}, parallel_tool_calls=True,
                    prompt_cache_key="thread-1", metadata={"a": "b"}, user="u", seed=7, temperature=0.2,
                    top_p=0.9, client_metadata={"x": 1}, frequency_penalty=0, n=1, logprobs=False)
    assert request.stream and request.include_usage


def test_system_and_developer_messages_become_the_system_prompt():
    request = parse(messages=[{"role": "system", "content": "Be terse."},
                              {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                              USER])
    assert request.session.system_prompt == "Be terse.\n\nUse French."
    assert request.prompt == Turn("user", [{"type": "text", "text": "hi"}])


def test_consecutive_user_messages_become_one_turn():
    request = parse(messages=[{"role": "user", "content": "one"}, {"role": "user", "content": [
        {"type": "text", "text": "two"}]}])
    assert request.history == ()
    assert request.prompt.content == [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]


def test_history_alternates_and_ends_with_the_prompt():
    request = parse(messages=[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                              {"role": "user", "content": "Q2"}])
    assert [t.role for t in request.history] == ["user", "assistant"]
    assert request.prompt.content == [{"type": "text", "text": "Q2"}]


def test_images_become_base64_or_url_blocks():
    request = parse(messages=[{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}}]}])
    assert request.prompt.content[1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


def test_tool_calls_and_results_become_tool_use_and_tool_result_blocks():
    request = parse(messages=[
        USER,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "exec", "arguments": "{\"command\": \"pwd\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "/home/user"},
        {"role": "user", "content": "and now?"}])
    assert request.history[1].content == [
        {"type": "tool_use", "id": "call_1", "name": "exec", "input": {"command": "pwd"}}]
    assert request.prompt.content == [{"type": "tool_result", "tool_use_id": "call_1", "content": texts("/home/user")},
                                      {"type": "text", "text": "and now?"}]


@pytest.mark.parametrize("fields, expected", [
    ({}, cmp.LaunchSettings(model="sonnet")),
    ({"max_tokens": 100}, cmp.LaunchSettings(model="sonnet", max_tokens=100)),
    ({"max_tokens": 100, "max_completion_tokens": 50}, cmp.LaunchSettings(model="sonnet", max_tokens=50)),
    ({"reasoning_effort": "minimal"}, cmp.LaunchSettings(model="sonnet", effort="low")),
    ({"reasoning_effort": "high"}, cmp.LaunchSettings(model="sonnet", effort="high")),
    ({"reasoning_effort": "none"}, cmp.LaunchSettings(model="sonnet", thinking=False)),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, cmp.LaunchSettings(model="sonnet")),
])
def test_request_fields_become_launch_settings(fields, expected):
    assert parse(**fields).launch == expected


def test_settings_are_keyed_by_a_digest_of_their_content():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    session = cmp.SessionSettings("Be brief.", (cmp.FunctionTool("f", "", schema),), {"type": "object"})
    same = cmp.SessionSettings("Be brief.", (cmp.FunctionTool("f", "", json.loads(json.dumps(schema))),),
                               {"type": "object"})
    assert cmp.digest(session) == cmp.digest(same)
    assert cmp.digest(session) != cmp.digest(cmp.SessionSettings("Be brief."))
    assert cmp.digest(cmp.LaunchSettings("sonnet")) != cmp.digest(cmp.LaunchSettings("sonnet", thinking=False))


def test_stop_accepts_a_string_or_a_list():
    assert parse(stop="END").stop == ("END",)
    assert parse(stop=["a", "b"]).stop == ("a", "b")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no description, no parameters
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


def test_tools_keep_their_names_descriptions_and_schemas():
    tools = parse(tools=[WEATHER, CLOCK]).session.tools
    assert tools == (cmp.FunctionTool("get_weather", "Weather for a city.", WEATHER["function"]["parameters"]),
                     cmp.FunctionTool("get_time", "", {"type": "object", "properties": {}}))


@pytest.mark.parametrize("choice, offered, instruction", [
    (None, ["get_weather", "get_time"], ""),
    ("auto", ["get_weather", "get_time"], ""),
    ("none", [], ""),
    ("required", ["get_weather", "get_time"], "Respond by calling one or more of the available functions"),
    ({"type": "function", "function": {"name": "get_time"}}, ["get_time"], "Respond by calling the function `get_time`"),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}}, ["get_weather"], ""),
])
def test_tool_choice_decides_what_claude_is_offered_and_told(choice, offered, instruction):
    settings = parse(messages=[{"role": "system", "content": "Be brief."}, USER], tools=[WEATHER, CLOCK],
                     tool_choice=choice).session
    assert [tool.name for tool in settings.tools] == offered
    assert settings.system_prompt.startswith("Be brief.") and instruction in settings.system_prompt
    assert bool(instruction) == (settings.system_prompt != "Be brief.")


def test_legacy_functions_become_tools_answered_one_call_at_a_time():
    request = parse(functions=[WEATHER["function"]], function_call={"name": "get_weather"})
    assert [tool.name for tool in request.session.tools] == ["get_weather"]
    assert request.legacy_functions and request.one_tool_call
    assert "`get_weather`" in request.session.system_prompt


def test_parallel_tool_calls_false_allows_one_call():
    assert parse(tools=[WEATHER], parallel_tool_calls=False).one_tool_call
    assert not parse(tools=[WEATHER]).one_tool_call


@pytest.mark.parametrize("response_format, schema", [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "Person", "strict": True, "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
     {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}),
])
def test_response_format_becomes_the_output_schema(response_format, schema):
    assert parse(response_format=response_format).session.output_schema == schema


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": []}}}]},
     "tools[0].function.parameters.properties"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "a"}}}]},
     "tools[0].function.parameters.required"),
    ({"tools": [CLOCK, CLOCK]}, "tools"),
    ({"tools": [CLOCK], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [CLOCK], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"tools": 5}}}, "tool_choice"),
    ({"tools": [CLOCK], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"tools": [
        {"type": "function", "function": "get_time"}]}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "StructuredOutput"}}],
      "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tools_and_formats_are_400s_naming_the_field(fields, param):
    with pytest.raises(ApiError) as caught:
        parse(**fields)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_tool_history_is_paired_by_the_ids_the_request_carries():
    request = parse(messages=[USER, dict(CALL, content="Checking.", tool_calls=CALL["tool_calls"] + [
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]),
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]},
        RESULT, {"role": "user", "content": "thanks"}])
    assert request.history[1].content == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Rome"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}]
    assert request.prompt.content == [{"type": "tool_result", "tool_use_id": "call_2", "content": texts("noon")},
                                      {"type": "tool_result", "tool_use_id": "call_1", "content": texts("sunny")},
                                      {"type": "text", "text": "thanks"}]


def test_ids_claude_would_reject_are_made_safe_and_stay_distinct():
    calls = [{"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
             for call_id in ("call.1", "call:1", "toolu_bdrk_01-ok")]
    request = parse(messages=[USER, {"role": "assistant", "tool_calls": calls},
                              *({"role": "tool", "tool_call_id": c["id"], "content": "r"} for c in calls)])
    used = [block["id"] for block in request.history[1].content]
    assert used[2] == "toolu_bdrk_01-ok" and len(set(used)) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in used)
    assert [block["tool_use_id"] for block in request.prompt.content] == used


def test_ids_a_client_reuses_across_turns_are_made_unique():
    again = [USER, CALL, RESULT, {"role": "assistant", "content": "More?"}, USER, CALL, RESULT]
    request = parse(messages=again)
    used = [block["id"] for turn in request.history for block in turn.content if block["type"] == "tool_use"]
    assert used[0] == "call_1" and len(set(used)) == 2
    assert request.prompt.content[0]["tool_use_id"] == used[1]


def test_legacy_function_messages_answer_the_function_call():
    request = parse(messages=[USER, {"role": "assistant", "content": None, "function_call": {
        "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"}])
    call = request.history[1].content[0]
    assert (call["type"], call["name"], call["input"]) == ("tool_use", "get_weather", {"city": "Rome"})
    assert request.prompt.content == [{"type": "tool_result", "tool_use_id": call["id"], "content": texts("sunny")}]


@pytest.mark.parametrize("messages, param, says", [
    ([USER, CALL, USER], "messages[1].tool_calls[0]", "no tool message answering it"),
    ([USER, CALL, {"role": "tool", "tool_call_id": "call_9", "content": "x"}], "messages[2].tool_call_id", "call_9"),
    ([USER, CALL, RESULT, RESULT], "messages[3].tool_call_id", "call_1"),
    ([USER, {"role": "function", "name": "f", "content": "x"}], "messages[1]", "no assistant function_call"),
    ([USER, dict(CALL, tool_calls=CALL["tool_calls"] * 2)], "messages[1].tool_calls[1]", "another call"),
    ([USER, dict(CALL, tool_calls=CALL["tool_calls"] + [dict(CALL["tool_calls"][0], id="call_2")]), RESULT],
     "messages[1].tool_calls[1]", "before the end of 'messages'"),
])
def test_unpaired_tool_messages_are_400s_as_at_openai(messages, param, says):
    with pytest.raises(ApiError) as caught:
        parse(messages=messages)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert says in caught.value.message


def test_thinking_is_off_for_the_turn_that_carries_tool_results_when_started_afresh():
    carrying = parse(messages=[USER, CALL, RESULT], tools=[WEATHER])
    assert carrying.launch.thinking and not carrying.fresh_launch.thinking
    assert parse(messages=[USER, CALL, RESULT, {"role": "assistant", "content": "Sunny."}, USER],
                 tools=[WEATHER]).fresh_launch.thinking


# The Responses API request.

def test_a_responses_request_becomes_a_chat_request():
    chat, new, _ = cmp.chat_body_from_responses({
        "model": "claude-opus-4", "instructions": "Be brief.", "max_output_tokens": 99, "stream": True,
        "reasoning": {"effort": "low", "summary": "auto"}, "store": False, "include": ["reasoning.encrypted_content"],
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Use French."}]},
            {"role": "user", "content": "Weather?"},  # no type, as openai-agents sends
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xx"},
            {"type": "message", "id": "msg_1", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather",
             "arguments": "{\"city\": \"Rome\"}"},
            {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "noon"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "So?"},
                                         {"type": "input_image", "image_url": "https://example.com/a.png"}]}]})
    assert {k: chat[k] for k in ("model", "stream", "max_completion_tokens", "reasoning_effort")} == {
        "model": "claude-opus-4", "stream": True, "max_completion_tokens": 99, "reasoning_effort": "low"}
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    assert new == chat["messages"][1:]
    assert chat["messages"][3] == {"role": "assistant", "content": [{"type": "text", "text": "Checking."}],
                                   "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    request = cmp.parse_chat_request(chat)
    assert request.session.system_prompt == "Be brief.\n\nUse French."
    assert [block["type"] for block in request.prompt.content] == ["tool_result", "tool_result", "text", "image"]
    assert request.launch.max_tokens == 99 and request.stream


def test_responses_tools_are_flattened_and_hosted_ones_left_out():
    body = {"model": "m", "input": "hi", "tool_choice": {"type": "function", "name": "spawn_agent"}, "tools": [
        {"type": "function", "name": "exec", "parameters": {"type": "object"}, "strict": False},
        {"type": "namespace", "name": "multi_agent_v1", "tools": [
            {"type": "function", "name": "spawn_agent", "description": "Spawn.", "parameters": {"type": "object"}}]},
        {"type": "web_search", "external_web_access": False}],
        "text": {"format": {"type": "json_schema", "name": "X", "schema": {"type": "object"}, "strict": True}}}
    chat, _, _ = cmp.chat_body_from_responses(body)
    assert [tool["function"]["name"] for tool in chat["tools"]] == ["exec", "spawn_agent"]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "spawn_agent"}}
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "X", "schema": {"type": "object"}, "strict": True}}
    assert cmp.namespaces_of(body["tools"]) == {"spawn_agent": "multi_agent_v1"}
    others = [{"type": "tool_search"}, {"type": "custom", "name": "apply_patch"},
              {"type": "namespace", "name": "n", "tools": [{"type": "custom", "name": "c"}]}]
    assert "tools" not in cmp.chat_body_from_responses({"model": "m", "input": "hi", "tools": others})[0]
    broken = {"model": "sonnet", "input": "hi", "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": 5}}
    with pytest.raises(ApiError) as caught:
        cmp.parse_chat_request(cmp.chat_body_from_responses(dict(broken, tools=body["tools"]))[0])
    assert (caught.value.status, caught.value.param) == (400, "tool_choice")


CALL_ITEM = {"type": "function_call", "call_id": "call_a", "name": "f", "arguments": "{}"}


@pytest.mark.parametrize("fields, param, says", [
    ({"max_output_tokens": 0}, "max_output_tokens", "'max_output_tokens' must be at least 1"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "'reasoning.effort' must be one of"),
    ({"text": {"format": {"type": "json_schema", "name": "X"}}}, "text.format.schema", "'text.format.schema'"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type", "'text.format.type'"),
    ({"tools": [{"type": "web_search"}, {"type": "namespace", "name": "n", "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "string"}}]}]},
     "tools[1].tools[0].parameters", "tools[1].tools[0].parameters must be"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role", "input[0] has an unknown role 'wizard'"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,@@"}]}]}, "input[1].content[0].image_url",
     "input[1].content[0].image_url"),
    ({"input": [{"role": "user", "content": "hi"}, dict(CALL_ITEM, arguments="[1]")]},
     "input[1].arguments", "input[1].arguments must be a JSON object"),
    ({"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Let me see."}, CALL_ITEM,
                {"type": "function_call_output", "call_id": "call_b", "output": "x"}]},
     "input[3].call_id", "input[3] answers tool_call_id 'call_b'"),
    ({"input": [{"role": "user", "content": "hi"}, CALL_ITEM, {"role": "user", "content": "and?"}]},
     "input[1]", "input[1] (id 'call_a') has no tool message answering it before input[2]"),
    ({"input": [{"role": "assistant", "content": "prefill"}]}, "input", "The last message must be a user"),
])
def test_responses_errors_name_the_responses_field(fields, param, says):
    with pytest.raises(ApiError) as caught:
        cmp.parse_responses_request({"model": "sonnet", "instructions": "Be brief.", "input": "hi", **fields})
    assert (caught.value.status, caught.value.param) == (400, param)
    assert says in caught.value.message, caught.value.message


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "input"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]"),
    ({"model": "m", "input": "hi", "text": {"format": "json"}}, "text.format"),
    ({"model": "m", "input": "hi", "instructions": 7}, "instructions"),
])
def test_bad_responses_requests_are_400s_naming_the_field(body, param):
    with pytest.raises(ApiError) as caught:
        cmp.chat_body_from_responses(body)
    assert (caught.value.status, caught.value.param) == (400, param)


# ── 5. The CLI process ──────────────────────────────────────────────────────

def test_argv_has_no_prompt_and_only_flag_equals_value_forms():
    settings = cmp.LaunchSettings(model="opus", effort="high", max_tokens=9)
    argv = cmp.build_cli_argv("claude", settings)
    assert "--tools=" in argv and "--no-session-persistence" in argv and "--setting-sources=" in argv
    assert argv[-2:] == ["--model=opus", "--effort=high"]
    assert all(arg.startswith("-") for arg in argv[1:])


def test_billing_variables_are_removed_unless_asked_for():
    environ = {"ANTHROPIC_API_KEY": "sk", "ANTHROPIC_AUTH_TOKEN": "t", "PATH": "/bin"}
    settings = cmp.LaunchSettings(model="opus", max_tokens=64, thinking=False)
    env = cmp.build_cli_env(environ, Config(max_retries=1), settings)
    assert "ANTHROPIC_API_KEY" not in env and "ANTHROPIC_AUTH_TOKEN" not in env
    assert (env["CLAUDE_CODE_MAX_RETRIES"], env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"],
            env["CLAUDE_CODE_DISABLE_THINKING"]) == ("1", "64", "1")
    kept = cmp.build_cli_env(environ, Config(use_api_key=True), settings)
    assert kept["ANTHROPIC_API_KEY"] == "sk" and kept["ANTHROPIC_AUTH_TOKEN"] == "t"


def test_every_cli_gets_the_tool_server_and_the_session_comes_in_initialize():
    tool = cmp.FunctionTool("get_time", "", {"type": "object", "properties": {}})
    plain = cmp.LaunchSettings(model="opus")
    assert set(cmp.TOOL_FLAGS) <= set(cmp.build_cli_argv("claude", plain))
    init = json.loads(cmp.initialize_line(cmp.SessionSettings("-rf / you are", (tool,), {"type": "object"})))["request"]
    assert (init["systemPrompt"], init["sdkMcpServers"], init["jsonSchema"]) == (
        "-rf / you are", [cmp.TOOL_SERVER], {"type": "object"})
    assert "jsonSchema" not in json.loads(cmp.initialize_line(cmp.SessionSettings()))["request"]
    assert cmp.build_cli_env({}, Config(), plain)["CLAUDE_AGENT_SDK_MCP_NO_PREFIX"] == "1"


def test_the_tool_server_lists_the_client_tools_and_answers_calls_with_the_clients_results():
    tool = cmp.FunctionTool("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})
    listed = cmp.mcp_reply({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, [tool], {})
    assert listed == {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "get_weather", "description": "Weather.", "inputSchema": tool.parameters,
         "_meta": {"anthropic/maxResultSizeChars": 500_000}}]}}
    hello = cmp.mcp_reply({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                           "params": {"protocolVersion": "2025-11-25"}}, [tool], {})
    assert hello["result"]["protocolVersion"] == "2025-11-25" and "tools" in hello["result"]["capabilities"]
    assert cmp.mcp_reply({"jsonrpc": "2.0", "method": "notifications/initialized"}, [tool], {}) == {}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "get_weather", "arguments": {"city": "Oslo"}, "_meta": {"claudecode/toolUseId": "toolu_1"}}}
    assert cmp.mcp_reply(call, [tool], {"toolu_1": "Sunny"}) == {
        "jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": "Sunny"}]}}
    assert cmp.mcp_reply(call, [tool], {"toolu_2": "Rain"})["error"]["code"] == -32601


def test_tools_the_cli_left_out_are_found_in_its_init_line():
    tools = [cmp.FunctionTool(name, "", {"type": "object"}) for name in ("a", "b")]
    assert cmp.dropped_tools({"type": "system", "subtype": "init", "tools": ["a"]}, tools) == ["b"]
    assert cmp.dropped_tools({"type": "system", "subtype": "init", "tools": ["b", "a"]}, tools) == []


def test_one_process_answers_two_turns_each_with_the_scenario_of_its_time(fake):
    cli = ClaudeProcess(Config(claude=fake.path), cmp.LaunchSettings("sonnet"))
    try:
        cli.initialize(cmp.SessionSettings("Be brief."))
        first = parse(messages=[{"role": "user", "content": "Q1"}])
        ends = [e for e in cli.run_turn(first, first.history, 10, lambda: False) if isinstance(e, TurnEnd)]
        assert ends[0].text == "Hello world"
        fake.play("thinking")
        second = parse(messages=[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "Hello world"},
                                 {"role": "user", "content": "Q2"}])
        events = list(cli.run_turn(second, (), 10, lambda: False))
        assert "".join(e.text for e in events if isinstance(e, TextDelta) and not e.reasoning) == "Hello"
        assert events[-1].stop_reason == "end_turn" and events[-1].reasoning == "Let me think. "
    finally:
        cli.close()
    sent = [line for line in fake.stdin() if line["type"] != "control_response"]  # (to the tool server)
    assert [line["type"] for line in sent] == ["control_request", "user", "user"]
    assert [line["message"]["content"] for line in sent[1:]] == [[{"type": "text", "text": "Q1"}],
                                                                 [{"type": "text", "text": "Q2"}]]
    assert len({entry["pid"] for entry in fake.log()}) == 1


def test_a_process_started_before_the_scenario_changed_plays_the_new_one(fake):
    cli = ClaudeProcess(Config(claude=fake.path), cmp.LaunchSettings("sonnet"))
    try:
        cli.initialize(cmp.SessionSettings())
        assert wait_until(lambda: fake.log())  # it is up and waiting
        fake.play("overloaded")
        request = parse()
        with pytest.raises(ApiError) as caught:
            list(cli.run_turn(request, request.history, 10, lambda: False))
        assert (caught.value.status, caught.value.code) == (503, "overloaded")
    finally:
        cli.close()


# ── 6. Claude's events ──────────────────────────────────────────────────────
# Lines shaped like the real CLI's stream-json (PROTOCOL.md §1, fixtures 01, 03, errors/*).

def stream_event(event, **extra):
    return {"type": "stream_event", "event": event, **extra}


def text_delta(text):
    return stream_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})


def thinking_delta(text):
    return stream_event({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "thinking_delta", "thinking": text}})


def message_start(input_tokens=10, cache_read=0):
    return stream_event({"type": "message_start", "message": {"usage": {
        "input_tokens": input_tokens, "cache_read_input_tokens": cache_read, "output_tokens": 1}}})


def success(text="", stop_reason="end_turn", usage=None):
    return {"type": "result", "subtype": "success", "is_error": False, "result": text,
            "stop_reason": stop_reason, "usage": usage or {"input_tokens": 10, "output_tokens": 5}}


def failure(message, status=None, error_kind=None, terminal="api_error"):
    synthetic = {"type": "assistant", "message": {"model": "<synthetic>", "content": [
        {"type": "text", "text": message}]}, "error": error_kind, "is_api_error_message": True}
    result = {"type": "result", "subtype": "success", "is_error": True, "result": message,
              "api_error_status": status, "terminal_reason": terminal, "stop_reason": "stop_sequence"}
    return [synthetic, result]


ABANDONED = stream_event({"type": "message_stop"},
                         abandoned_blocks={"api_message_id": "msg_1", "from_block_index": 0})


def test_a_burst_of_deltas_of_one_block_is_read_as_one_delta():
    second_block = text_delta("x")
    second_block["event"]["index"] = 1
    lines = [thinking_delta("Hm"), thinking_delta("m."), text_delta("He"), text_delta("l"), text_delta("lo"),
             second_block, message_start(), text_delta("!"), "not json", [1], text_delta("?")]
    raw = [(line if isinstance(line, str) else json.dumps(line)).encode() for line in lines]
    assert cmp.stream_json_events(raw) == [
        thinking_delta("Hmm."), text_delta("Hello"), second_block, message_start(), text_delta("!"), b"not json",
        b"[1]", text_delta("?")]


@pytest.mark.parametrize("text", ["plain ", 'a "quote", a \\ and\na line', "é ünïcode 😀", ""])
@pytest.mark.parametrize("kind", ["text_delta", "thinking_delta"])
def test_a_delta_line_read_without_parsing_it_whole_is_the_event_json_would_give(text, kind):
    key = cmp.DELTA_TEXT[kind]
    event = {"type": "stream_event", "event": {"type": "content_block_delta", "index": 2,
                                               "delta": {"type": kind, key: text}}}
    for ensure_ascii in (True, False):  # as the real CLI writes it: compact, these keys first
        line = json.dumps({**event, "session_id": "s1", "parent_tool_use_id": None, "uuid": "u1"},
                          separators=(",", ":"), ensure_ascii=ensure_ascii).encode()
        plain = '"' not in text and "\\" not in text and (ensure_ascii is False or text.isascii())
        assert (cmp.read_text_delta(line) == (2, kind, text)) is plain  # else it is parsed whole
        assert [found["event"] for found in cmp.stream_json_events([line])] == [event["event"]]
        assert [found["event"] for found in cmp.stream_json_events([line, line])] == \
            [text_delta_event(2, kind, text * 2)["event"]]
    spaced = json.dumps({**event, "uuid": "u1"}).encode()  # any other shape is parsed whole
    assert cmp.read_text_delta(spaced) is None and cmp.stream_json_events([spaced]) == [{**event, "uuid": "u1"}]
    for broken in (b'{"type":"stream_event","event":{"type":"content_block_delta","index":0,'
                   b'"delta":{"type":"text_delta","text":"cut off',
                   b'{"type":"stream_event","event":{"type":"content_block_delta","index":0,'
                   b'"delta":{"type":"text_delta","text":"bad \xff byte"}}}'):
        assert cmp.stream_json_events([broken]) == [broken]
    mismatched = b'{"type":"stream_event","event":{"type":"content_block_delta","index":0,' \
                 b'"delta":{"type":"text_delta","thinking":"x"}}}'
    assert cmp.read_text_delta(mismatched) is None
    assert cmp.stream_json_events([mismatched]) == [json.loads(mismatched)]


def text_delta_event(index, kind, text):
    return {"type": "stream_event", "event": {"type": "content_block_delta", "index": index,
                                              "delta": {"type": kind, cmp.DELTA_TEXT[kind]: text}}}


def translate(lines, **options):
    translator = TurnTranslator(**options)
    return translator, [out for line in lines for out in translator.feed(line)]


def test_text_deltas_and_the_end_of_a_turn():
    _, out = translate([{"type": "system", "subtype": "init"}, message_start(), text_delta("Hello "),
                        text_delta("world"), {"type": "assistant", "message": {"content": [
                            {"type": "text", "text": "Hello world"}]}},
                        success("Hello world", usage={"input_tokens": 3, "output_tokens": 2,
                                                      "cache_read_input_tokens": 100,
                                                      "cache_creation_input_tokens": 20,
                                                      "output_tokens_details": {"thinking_tokens": 1}})])
    assert out == [TurnStart(Usage(input_tokens=10, output_tokens=1)), TextDelta("Hello "), TextDelta("world"),
                   TurnEnd("end_turn", Usage(input_tokens=3, output_tokens=2, cache_read_tokens=100,
                                             cache_write_tokens=20, reasoning_tokens=1), "Hello world")]


def signature_delta(signature):
    return stream_event({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "signature_delta", "signature": signature}})


def test_thinking_becomes_reasoning_deltas_and_keeps_its_signature():
    _, out = translate([message_start(), thinking_delta("Let me think. "), signature_delta("c2ln"),
                        text_delta("Answer."), success("Answer.")])
    assert out[1:4] == [TextDelta("Let me think. ", reasoning=True), ThinkingSignature("c2ln"), TextDelta("Answer.")]
    assert (out[-1].reasoning, out[-1].signature) == ("Let me think. ", "c2ln")


def test_thinking_cut_short_is_not_signed():
    # The seal is for the whole thinking: on a part of it, it would be false.
    _, out = translate([message_start(), thinking_delta("Let me think"), ABANDONED, message_start(),
                        thinking_delta("Hmm, so"), signature_delta("c2ln"), text_delta("Paris"), success()])
    assert not any(isinstance(o, ThinkingSignature) for o in out)
    assert out[-1].signature == ""


def test_synthetic_error_text_is_never_forwarded():
    with pytest.raises(ApiError) as caught:
        translate(failure("API Error: Request rejected (429) · slow down", 429, "rate_limit"))
    assert caught.value.status == 429
    assert ("Retry-After", "60") in caught.value.headers


def test_restarted_stream_that_repeats_itself_is_not_duplicated():
    _, out = translate([message_start(), text_delta("Hello "), text_delta("wor"), ABANDONED,
                        message_start(), text_delta("Hello "), text_delta("world"), text_delta("!"), success()])
    assert [o.text for o in out if isinstance(o, TextDelta)] == ["Hello ", "wor", "ld", "!"]
    assert out[-1].text == "Hello world!"


def test_non_streaming_fallback_after_a_drop_completes_the_text():
    fallback = {"type": "assistant", "message": {"id": "msg_2", "content": [{"type": "text", "text": "Hi there"}]}}
    _, out = translate([message_start(), text_delta("Hi "), ABANDONED, fallback, success("Hi there")])
    assert "".join(o.text for o in out if isinstance(o, TextDelta)) == "Hi there"


def test_a_retry_that_writes_something_else_fails_a_live_stream():
    lines = [message_start(), text_delta("Partial "), ABANDONED, message_start(), text_delta("Other"), success()]
    with pytest.raises(ApiError) as caught:
        translate(lines)
    assert (caught.value.status, caught.value.code) == (502, "upstream_stream_restarted")
    _, out = translate(lines, live=False)  # a non-streaming reply simply starts over
    assert out[-1].text == "Other"


def test_thinking_that_a_retry_rewrites_is_cut_short_not_fatal():
    _, out = translate([message_start(), thinking_delta("Let me think"), ABANDONED, message_start(),
                        thinking_delta("Hmm, so"), text_delta("Paris"), success()])
    assert out[1:] == [TextDelta("Let me think", reasoning=True), TextDelta("Paris"),
                   TurnEnd("end_turn", Usage(input_tokens=10, output_tokens=5), "Paris", "Let me think")]


def test_usage_falls_back_to_the_stream_when_the_result_has_none():
    _, out = translate([message_start(input_tokens=42, cache_read=7), text_delta("x"),
                        success("x", usage={"input_tokens": 0, "output_tokens": 0})])
    assert out[-1].usage == Usage(input_tokens=42, output_tokens=1, cache_read_tokens=7)


@pytest.mark.parametrize("pieces, stops, sent, stop_reason", [
    (["Hello STOP world"], ["STOP"], "Hello ", "stop_sequence"),
    (["Hello ST", "OP world"], ["STOP"], "Hello ", "stop_sequence"),
    (["Hel", "lo", " S", "T", "OP"], ["STOP"], "Hello ", "stop_sequence"),
    (["one\n\ntwo"], ["\n\n", "two"], "one", "stop_sequence"),
    (["ST", "ART and STOP"], ["STOP"], "START and ", "stop_sequence"),
    (["no stop here"], ["STOP"], "no stop here", "end_turn"),
    (["ends with ST"], ["STOP"], "ends with ST", "end_turn"),
])
def test_stop_sequences_cut_the_text(pieces, stops, sent, stop_reason):
    _, out = translate([message_start(), *map(text_delta, pieces), success()], stop=stops)
    assert "".join(o.text for o in out if isinstance(o, TextDelta)) == sent
    assert (out[-1].stop_reason, out[-1].text) == (stop_reason, sent)


def test_any_number_of_stop_strings_is_accepted_as_continue_sends_them():
    stops = ["</s>", "\n\n\n", "```", "<|endoftext|>", "[/INST]", "STOP", "STOP"]
    request = cmp.parse_chat_request({"model": "claude-sonnet-4", "messages": [USER], "stop": stops})
    assert request.stop == ("</s>", "\n\n\n", "```", "<|endoftext|>", "[/INST]", "STOP")
    _, out = translate([message_start(), text_delta("one [/IN"), text_delta("ST] two"), success()], stop=request.stop)
    assert (out[-1].stop_reason, out[-1].text) == ("stop_sequence", "one ")


def test_after_a_stop_sequence_nothing_more_is_sent_and_usage_comes_from_the_stream():
    interrupted = {"type": "result", "subtype": "error_during_execution", "is_error": True,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
    translator, out = translate([message_start(input_tokens=42), text_delta("a."), text_delta("b"),
                                 interrupted], stop=["."])
    assert out[1:] == [TextDelta("a"), TurnEnd("stop_sequence", Usage(input_tokens=42, output_tokens=1), "a",
                                           stop_sequence=".")]



def tool_use_start(index, call_id, name):
    return stream_event({"type": "content_block_start", "index": index,
                         "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}})


def arguments(index, piece):
    return stream_event({"type": "content_block_delta", "index": index,
                         "delta": {"type": "input_json_delta", "partial_json": piece}})


def block_stop(index):
    return stream_event({"type": "content_block_stop", "index": index})


def tool_use_stop(output_tokens=20):
    return stream_event({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                         "usage": {"output_tokens": output_tokens}})


NAMES = ("get_weather", "get_time", "f")  # the client's tools
REFUSED = {"type": "result", "subtype": "error_during_execution", "is_error": True, "stop_reason": "tool_use",
           "terminal_reason": "aborted_tools", "usage": {"input_tokens": 10, "output_tokens": 20}}
TWO_CALLS = [message_start(), text_delta("Checking."), block_stop(0),
             tool_use_start(1, "toolu_1", "get_weather"), arguments(1, '{"ci'), arguments(1, 'ty": "Z\\u00'),
             arguments(1, 'fcrich"}'), block_stop(1),
             tool_use_start(2, "toolu_2", "get_time"), block_stop(2), tool_use_stop()]


def test_tool_calls_stream_as_fragments_and_end_the_turn():
    translator, out = translate(TWO_CALLS, tools=NAMES)
    assert out[1:] == [TextDelta("Checking."),
                   cmp.ToolCallDelta(0, "", id="toolu_1", name="get_weather"), cmp.ToolCallDelta(0, '{"ci'),
                   cmp.ToolCallDelta(0, 'ty": "Z\\u00'), cmp.ToolCallDelta(0, 'fcrich"}'),
                   cmp.ToolCallDelta(1, "", id="toolu_2", name="get_time"), cmp.ToolCallDelta(1, "{}")]
    assert translator.ended_by == "tool_use"  # the caller ends the CLI's turn: the client runs the tools
    end = translator.feed(REFUSED)[-1]
    assert (end.stop_reason, end.text) == ("tool_use", "Checking.")
    assert end.tool_calls == (cmp.ToolCall("toolu_1", "get_weather", '{"city": "Z\\u00fcrich"}'),
                              cmp.ToolCall("toolu_2", "get_time", "{}"))
    assert json.loads(end.tool_calls[0].arguments) == {"city": "Zürich"}


def test_one_tool_call_ends_the_turn_after_the_first():
    translator, out = translate(TWO_CALLS, tools=NAMES, one_tool_call=True)
    assert [o.index for o in out if isinstance(o, cmp.ToolCallDelta)] == [0, 0, 0, 0]
    assert translator.feed(REFUSED)[-1].tool_calls == (
        cmp.ToolCall("toolu_1", "get_weather", '{"city": "Z\\u00fcrich"}'),)


def test_a_refused_call_from_the_non_streaming_fallback_ends_with_tool_calls():
    fallback = {"type": "assistant", "message": {"id": "msg_2", "content": [
        {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}}]}}
    _, out = translate([fallback, REFUSED], tools=NAMES)
    assert out[-1].stop_reason == "tool_use"
    assert out[-1].tool_calls == (cmp.ToolCall("toolu_9", "get_weather", '{"city": "Oslo"}'),)


def test_a_restart_after_a_call_was_sent_fails_a_live_stream():
    lines = [message_start(), tool_use_start(0, "toolu_1", "f"), arguments(0, "{}"), ABANDONED,
             message_start(), tool_use_start(0, "toolu_2", "f"), arguments(0, "{}"), block_stop(0),
             tool_use_stop(), REFUSED]
    with pytest.raises(ApiError) as caught:
        translate(lines, tools=NAMES)
    assert caught.value.code == "upstream_stream_restarted"
    _, out = translate(lines, tools=NAMES, live=False)
    assert out[-1].tool_calls == (cmp.ToolCall("toolu_2", "f", "{}"),)


@pytest.mark.parametrize("live, cut_short", [(True, []), (False, [tool_use_start(1, "toolu_2", "f")])])
def test_a_whole_call_before_the_stream_broke_off_stands(live, cut_short):
    # Measured: the CLI keeps the finished blocks, does not retry, and asks to run the call.
    broke_off = stream_event({"type": "message_stop"}, abandoned_blocks={"api_message_id": "m", "from_block_index": 1})
    _, out = translate([message_start(), tool_use_start(0, "toolu_1", "f"), arguments(0, "{}"), block_stop(0),
                        *cut_short, broke_off, REFUSED], tools=NAMES, live=live)
    assert out[-1].stop_reason == "tool_use"
    assert out[-1].tool_calls == (cmp.ToolCall("toolu_1", "f", "{}"),)


def test_calls_to_tools_the_client_does_not_have_are_left_to_the_cli():
    # The CLI answers Claude "No such tool available" and Claude goes on.
    translator, out = translate([message_start(), tool_use_start(0, "toolu_1", "rm_rf"), arguments(0, "{}"),
                                 block_stop(0), tool_use_stop(), message_start(), text_delta("Sorry."),
                                 success("Sorry.")], tools=NAMES)
    assert out[1:] == [TextDelta("Sorry."), TurnEnd("end_turn", Usage(10, 5), "Sorry.")]


def test_text_held_for_a_stop_sequence_is_sent_before_a_call():
    _, out = translate([message_start(), text_delta("Checking the E"), tool_use_start(1, "toolu_1", "f"),
                        arguments(1, "{}"), block_stop(1), tool_use_stop(), REFUSED], tools=NAMES, stop=["END"])
    assert out[1:3] == [TextDelta("Checking the "), TextDelta("E")]
    assert out[-1].text == "Checking the E"


def test_structured_output_is_the_checked_json_not_the_talk_around_it():
    lines = [message_start(), text_delta("Here it is."), block_stop(0),
             tool_use_start(1, "toolu_s", "StructuredOutput"), arguments(1, '{"name": "Alice"}'), block_stop(1),
             tool_use_stop(), {"type": "user", "message": {"content": [{"type": "tool_result"}]}},
             success('{"name":"Alice"}', stop_reason="tool_use")]
    lines[-1]["structured_output"] = {"name": "Alice"}
    translator, out = translate(lines, structured=True)
    assert translator.ended_by is None  # the CLI checks the output against the schema itself
    assert out[1:] == [TextDelta('{"name":"Alice"}'),
                   TurnEnd("end_turn", Usage(input_tokens=10, output_tokens=5), '{"name":"Alice"}')]


def test_structured_output_refused_in_words_keeps_its_stop_reason():
    _, out = translate([message_start(), text_delta("I can't help with that."),
                        success("I can't help with that.", stop_reason="refusal")], structured=True)
    assert (out[-1].text, out[-1].stop_reason) == ("I can't help with that.", "refusal")


@pytest.mark.parametrize("lines, status, code", [
    (failure("Not logged in · Please run /login", None, "authentication_failed"), 503, "claude_not_logged_in"),
    (failure("Invalid API key · Fix external API key", 401, "authentication_failed"), 503,
     "claude_not_logged_in"),
    (failure("API Error: Repeated 529 Overloaded errors", 529, "unknown"), 503, "overloaded"),
    (failure("Prompt is too long", None, None, terminal="blocking_limit"), 400, "context_length_exceeded"),
    (failure("Request too large (max 32MB)", 413, None, terminal="image_error"), 413, "request_too_large"),
    (failure("There's an issue with the selected model", 404, "model_not_found"), 404, "model_not_found"),
    (failure("API Error: 400 messages: bad", 400, "invalid_request"), 400, "invalid_request"),
    (failure("API Error: 500 Internal server error", 500, "server_error"), 502, "upstream_error"),
])
def test_claude_failures_map_to_statuses_clients_can_act_on(lines, status, code):
    with pytest.raises(ApiError) as caught:
        translate(lines)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_rate_limit_retry_after_comes_from_the_subscription_window():
    window = {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1_000_120}}
    with pytest.raises(ApiError) as caught:
        translate([window, *failure("usage limit reached", 429, "rate_limit")], clock=lambda: 1_000_000)
    assert ("Retry-After", "120") in caught.value.headers


def test_rate_limit_retry_after_is_the_clis_own_wait_without_a_window():
    retry = {"type": "system", "subtype": "api_retry", "attempt": 1, "retry_delay_ms": 2000, "error_status": 429}
    with pytest.raises(ApiError) as caught:
        translate([retry, *failure("Request rejected (429)", 429, "rate_limit")])
    assert ("Retry-After", "2") in caught.value.headers


def test_not_logged_in_says_how_to_log_in():
    with pytest.raises(ApiError) as caught:
        translate(failure("Not logged in · Please run /login", None, "authentication_failed"))
    assert "run `claude`" in caught.value.message and "log in" in caught.value.message



def test_extra_usage_billing_is_402_extra_usage_required():
    message = ('API Error: 400 {"type":"error","error":{"type":"invalid_request_error","message":"Third-party '
               'apps now draw from your extra usage, not your plan limits. Claim it at claude.ai/settings/usage"}}')
    with pytest.raises(ApiError) as caught:
        translate(failure(message, 400, "invalid_request"))
    assert (caught.value.status, caught.value.code) == (402, "extra_usage_required")
    assert "extra usage" in caught.value.message and "Retry-After" not in dict(caught.value.headers)


NOW = 1_800_000_000
WARNING = {"status": "allowed", "resetsAt": NOW + 3600, "rateLimitType": "five_hour", "isUsingOverage": False,
           "overageStatus": "rejected", "overageDisabledReason": "org_level_disabled",
           "unifiedWindows": {"five_hour": {"utilization": 0.87, "resetsAt": NOW + 3600, "status": "allowed_warning"},
                              "seven_day": {"utilization": 0.41, "resetsAt": NOW + 86400}}}
OVERAGE = {"status": "rejected", "resetsAt": NOW + 600, "rateLimitType": "five_hour", "isUsingOverage": True,
           "overageStatus": "allowed",
           "unifiedWindows": {"five_hour": {"utilization": 1, "resetsAt": NOW + 600, "status": "rejected"}}}


def test_usage_report_has_each_window_and_how_old_it_is():
    assert cmp.usage_report((WARNING, NOW - 30), NOW, allow_extra_usage=False) == {
        "object": "usage", "status": "allowed_warning", "seen_at": "2027-01-15T07:59:30Z", "age_seconds": 30,
        "windows": {
            "five_hour": {"used": 0.87, "status": "allowed_warning", "resets_at": "2027-01-15T09:00:00Z",
                          "resets_in_seconds": 3600},
            "seven_day": {"used": 0.41, "status": "allowed", "resets_at": "2027-01-16T08:00:00Z",
                          "resets_in_seconds": 86400}},
        "extra_usage": {"allowed": False, "in_use": False, "status": "rejected",
                        "disabled_reason": "org_level_disabled"}}


def test_numbers_the_cli_reports_that_are_no_time_or_fraction_are_left_out():
    odd = {"status": "rejected", "resetsAt": 1e300, "isUsingOverage": True,
           "unifiedWindows": {"five_hour": {"utilization": True, "resetsAt": "soon"}}}
    assert cmp.usage_report((odd, NOW), NOW, False)["windows"]["five_hour"] == {
        "used": None, "status": "allowed", "resets_at": None, "resets_in_seconds": None}
    assert cmp.usage_headers((odd, NOW), NOW) == [("anthropic-ratelimit-unified-status", "rejected")]
    assert cmp.extra_usage_refusal((odd, NOW), NOW) is None
    assert cmp.read_text_delta(b'{"type":"stream_event","event":{"type":"content_block_delta","index":' + b"9" * 5000 +
                               b',"delta":{"type":"text_delta","text":"x"}}}') is None


def test_usage_report_before_any_window_was_seen_says_why():
    report = cmp.usage_report(None, NOW, allow_extra_usage=True)
    assert report["windows"] is None and "API key" in report["reason"]
    assert report["extra_usage"] == {"allowed": True, "in_use": None}


def test_a_window_past_its_reset_no_longer_shows_what_was_used():
    report = cmp.usage_report((WARNING, NOW), NOW + 7200, allow_extra_usage=False)
    assert report["windows"]["five_hour"] == {"used": None, "status": "reset", "resets_at": "2027-01-15T09:00:00Z",
                                              "resets_in_seconds": 0}
    assert report["windows"]["seven_day"]["used"] == 0.41
    assert dict(cmp.usage_headers((WARNING, NOW), NOW + 7200)) == {
        "anthropic-ratelimit-unified-status": "allowed_warning",
        "anthropic-ratelimit-unified-7d-utilization": "0.41", "anthropic-ratelimit-unified-7d-reset": str(NOW + 86400)}


def test_usage_headers_are_anthropics_own():
    assert cmp.usage_headers(None, NOW) == []
    assert cmp.usage_headers((WARNING, NOW), NOW) == [
        ("anthropic-ratelimit-unified-status", "allowed_warning"),
        ("anthropic-ratelimit-unified-5h-utilization", "0.87"),
        ("anthropic-ratelimit-unified-5h-reset", str(NOW + 3600)),
        ("anthropic-ratelimit-unified-5h-status", "allowed_warning"),
        ("anthropic-ratelimit-unified-7d-utilization", "0.41"),
        ("anthropic-ratelimit-unified-7d-reset", str(NOW + 86400))]
    assert dict(cmp.usage_headers((OVERAGE, NOW), NOW))["anthropic-ratelimit-unified-status"] == "rejected"


def test_extra_usage_in_use_is_refused_until_the_window_resets():
    refusal = cmp.extra_usage_refusal((OVERAGE, NOW), NOW + 100)
    assert (refusal.status, refusal.code) == (402, "extra_usage_in_use")
    assert ("Retry-After", "500") in refusal.headers and "--allow-extra-usage" in refusal.message
    assert cmp.extra_usage_refusal((OVERAGE, NOW), NOW + 600) is None
    assert cmp.extra_usage_refusal((WARNING, NOW), NOW) is None
    assert cmp.extra_usage_refusal(None, NOW) is None


def test_every_cli_reports_the_windows_it_sees_to_one_place():
    windows = cmp.UsageWindows(clock=lambda: NOW)
    windows.seen("not a dict")
    assert windows.latest() is None
    windows.seen(WARNING)
    assert windows.latest() == (WARNING, NOW)

# ── 7. The OpenAI response ──────────────────────────────────────────────────

@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), (None, "stop"),
])
def test_finish_reasons(stop_reason, finish):
    assert cmp.finish_reason(stop_reason) == finish


def test_usage_counts_cache_reads_and_writes_as_prompt_tokens():
    usage = Usage(input_tokens=5, output_tokens=7, cache_read_tokens=100, cache_write_tokens=20,
                  reasoning_tokens=3)
    assert cmp.usage_body(usage) == {"prompt_tokens": 125, "completion_tokens": 7, "total_tokens": 132,
                                     "prompt_tokens_details": {"cached_tokens": 100},
                                     "completion_tokens_details": {"reasoning_tokens": 3}}


def test_chunks_share_id_created_and_model():
    reply = cmp.Reply("openai/claude-opus-4", include_usage=True)
    chunks = [reply.chunk({"role": "assistant"}), reply.delta_chunk(TextDelta("x")),
              reply.usage_chunk(Usage())]
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == \
        {(reply.id, reply.created, "openai/claude-opus-4", "chat.completion.chunk")}
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 0


def test_a_completion_with_tool_calls():
    end = TurnEnd("tool_use", Usage(10, 20), tool_calls=(cmp.ToolCall("toolu_1", "get_time", "{}"),))
    choice = cmp.Reply("m").whole(end)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    legacy = cmp.Reply("m", legacy_functions=True).whole(end)["choices"][0]
    assert legacy["finish_reason"] == "function_call"
    assert legacy["message"]["function_call"] == {"name": "get_time", "arguments": "{}"}
    assert "tool_calls" not in legacy["message"]


def test_a_chat_stream_is_the_role_the_deltas_the_finish_and_the_usage():
    reply = cmp.Reply("m", include_usage=True)
    end = TurnEnd("end_turn", Usage(10, 2), "Hi")
    frames = reply.start() + reply.feed(TextDelta("Hi")) + reply.feed(end)
    assert [f["choices"][0]["delta"] if f["choices"] else f["usage"]["total_tokens"] for f in frames] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}, {}, 12]
    assert frames[2]["choices"][0]["finish_reason"] == "stop"
    assert reply.sse(frames[1]) == b"data: " + json.dumps(frames[1]).encode() + b"\n\n"
    assert reply.fail(ApiError(502, "gone")) == [ApiError(502, "gone").body()]


def test_tool_call_chunks_carry_id_and_name_on_the_first_fragment_only():
    reply = cmp.Reply("m")
    first = reply.tool_call_chunk(cmp.ToolCallDelta(1, "", id="toolu_2", name="get_time"))
    later = reply.tool_call_chunk(cmp.ToolCallDelta(1, '{"a"'))
    assert first["choices"][0]["delta"] == {"tool_calls": [
        {"index": 1, "id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]}
    assert later["choices"][0]["delta"] == {"tool_calls": [{"index": 1, "function": {"arguments": '{"a"'}}]}
    legacy = cmp.Reply("m", legacy_functions=True)
    assert legacy.tool_call_chunk(cmp.ToolCallDelta(0, "", id="toolu_2", name="f"))["choices"][0]["delta"] == {
        "function_call": {"name": "f", "arguments": ""}}


# The Responses API answer.

def build(events, echo=None, namespaces=()):
    builder = cmp.ResponseBuilder(echo or {"model": "m"}, namespaces)
    return builder, builder.start() + [frame for event in events for frame in builder.feed(event)]


def test_a_text_answer_as_responses_events():
    builder, frames = build([TextDelta("Hmm.", reasoning=True), TextDelta("Hel"), TextDelta("lo"),
                             TurnEnd("end_turn", Usage(10, 5, cache_read_tokens=3), "Hello", "Hmm.")])
    assert [f["type"] for f in frames] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [f["sequence_number"] for f in frames] == list(range(len(frames)))
    message_id = frames[8]["item"]["id"]
    assert message_id.startswith("msg_") and all(f["item_id"] == message_id for f in frames[9:14])
    assert frames[12]["text"] == "Hello" and frames[14]["item"]["content"] == [
        {"type": "output_text", "text": "Hello", "annotations": []}]
    final = frames[-1]["response"]
    assert final == builder.response and final["status"] == "completed" and final["output_text"] == "Hello"
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["summary"] == [{"type": "summary_text", "text": "Hmm."}]
    assert final["usage"] == {"input_tokens": 13, "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
                              "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 18}
    assert frames[0]["response"]["status"] == "in_progress" and frames[0]["response"]["output"] == []


def test_function_calls_as_responses_items():
    _, frames = build([cmp.ToolCallDelta(0, "", id="toolu_01Ab", name="spawn_agent"), cmp.ToolCallDelta(0, '{"a"'),
                       cmp.ToolCallDelta(0, ": 1}"), cmp.ToolCallDelta(1, "", id="toolu_02", name="exec"),
                       cmp.ToolCallDelta(1, "{}"), TurnEnd("tool_use", Usage(10, 20))],
                      namespaces={"spawn_agent": "multi_agent_v1"})
    added = [f["item"] for f in frames if f["type"] == "response.output_item.added"]
    assert [(i["type"], i["call_id"], i["name"], i["arguments"]) for i in added] == [
        ("function_call", "call_01Ab", "spawn_agent", ""), ("function_call", "call_02", "exec", "")]
    assert added[0]["namespace"] == "multi_agent_v1" and "namespace" not in added[1]
    deltas = [f["delta"] for f in frames if f["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"a"', ": 1}", "{}"]
    done = [f for f in frames if f["type"] == "response.function_call_arguments.done"]
    assert [(f["arguments"], f["output_index"]) for f in done] == [('{"a": 1}', 0), ("{}", 1)]
    final = frames[-1]["response"]
    assert final["status"] == "completed" and final["output_text"] == ""
    assert [item["status"] for item in final["output"]] == ["completed", "completed"]


def test_a_cut_answer_is_incomplete_and_a_failure_is_failed():
    _, frames = build([TextDelta("trunc"), TurnEnd("max_tokens", Usage(1, 3), "trunc")])
    assert frames[-1]["type"] == "response.incomplete"
    assert frames[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert frames[-1]["response"]["output"][0]["status"] == "incomplete"
    builder, _ = build([TextDelta("Hel")])
    failed = builder.fail(ApiError(429, "Claude usage or rate limit reached", code="rate_limit_exceeded"))
    assert [f["type"] for f in failed] == ["response.failed"]
    assert failed[0]["response"]["error"] == {"code": "rate_limit_exceeded", "type": "rate_limit_exceeded",
                                              "message": "Claude usage or rate limit reached", "param": None}
    # OpenAI's clients accept only OpenAI's codes in a failed response.
    timeout = builder.fail(ApiError(504, "Claude did not finish", code="timeout"))[0]["response"]["error"]
    assert (timeout["code"], timeout["type"]) == ("server_error", "timeout")


def test_a_call_cut_short_is_not_kept_for_the_next_turn():
    builder, _ = build([cmp.ToolCallDelta(0, "", id="toolu_1", name="f"), cmp.ToolCallDelta(0, "{}"),
                        cmp.ToolCallDelta(1, "", id="toolu_2", name="f"), cmp.ToolCallDelta(1, '{"a": "x'),
                        TurnEnd("max_tokens", Usage(1, 3))])
    assert builder.chat_messages() == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


def test_a_whole_turn_builds_the_same_response_as_its_stream():
    end = TurnEnd("tool_use", Usage(10, 20), "Checking.", "Hmm.", (cmp.ToolCall("toolu_1", "f", "{}"),))
    streamed, _ = build([TextDelta("Hmm.", reasoning=True), TextDelta("Check"), TextDelta("ing."),
                         cmp.ToolCallDelta(0, "", id="toolu_1", name="f"), cmp.ToolCallDelta(0, "{}"), end])
    whole = cmp.ResponseBuilder({"model": "m"})
    whole.whole(end)
    strip = lambda r: [{k: v for k, v in item.items() if k != "id"} for item in r["output"]]  # noqa: E731
    assert strip(whole.response) == strip(streamed.response)
    assert whole.response["output_text"] == "Checking." and whole.response["status"] == "completed"


def test_stored_responses_are_forgotten_by_age_count_and_size():
    now = [0.0]
    store = cmp.ResponseStore(limit=3, max_bytes=100, seconds=60, clock=lambda: now[0])
    first = [{"role": "user", "content": "1"}]
    store.put({"id": "resp_1"}, first, size=10)
    now[0] = 50
    store.put({"id": "resp_2"}, first + [{"role": "user", "content": "2"}], size=10)
    now[0] = 70  # resp_1 is too old now; resp_2, which followed it, still holds the whole conversation
    assert [m["content"] for m in store.conversation("resp_2")] == ["1", "2"]
    with pytest.raises(ApiError) as caught:
        store.conversation("resp_1")
    assert (caught.value.status, caught.value.code, caught.value.param) == (
        404, "response_not_found", "previous_response_id")
    store.put({"id": "resp_3"}, [], size=10)
    store.put({"id": "resp_4"}, [], size=10)
    store.put({"id": "resp_5"}, [], size=10)  # a fourth: the oldest goes
    with pytest.raises(ApiError):
        store.get("resp_2")
    store.put({"id": "resp_6"}, [], size=85)  # over the byte budget: the oldest go until it fits
    with pytest.raises(ApiError):
        store.get("resp_4")
    assert store.get("resp_5") == {"id": "resp_5"} and store.get("resp_6") == {"id": "resp_6"}
    store.delete("resp_6")
    with pytest.raises(ApiError):
        store.get("resp_6")

# ── 8. The HTTP server, with the fake `claude` (fast) ───────────────────────

def test_completion(client):
    reply = client.chat(model="openai/claude-opus-4")
    assert reply.status == 200
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == "openai/claude-opus-4"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello world",
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 132, "completion_tokens": 3, "total_tokens": 135,
                             "prompt_tokens_details": {"cached_tokens": 100},
                             "completion_tokens_details": {"reasoning_tokens": 0}}


def test_stream(client, fake):
    fake.play("thinking")
    reply, frames = client.stream(stream_options={"include_usage": True},
                                  headers={"Accept": "application/json"})  # as the JS SDK sends
    assert reply.status == 200 and reply.getheader("Content-Type").startswith("text/event-stream")
    assert reply.getheader("Transfer-Encoding") == "chunked"
    chunks = [f for f in frames if isinstance(f, dict)]
    assert frames[-1] == "[DONE]" and len(chunks) == len(frames) - 1
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert sum("role" in c["choices"][0]["delta"] for c in chunks if c["choices"]) == 1
    # Text that came together may go out as one delta: "Hel" and "lo" did, or did not.
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert deltas[0] == {"reasoning_content": "Let me think. "} and content_of(chunks) == "Hello"
    assert all(set(delta) == {"content"} for delta in deltas[1:]) and len(deltas) in (2, 3)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None] * (len(deltas) + 1) + ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 15


def test_stream_without_include_usage_has_no_usage_chunk(client):
    _, frames = client.stream()
    assert all(f["choices"] and "usage" not in f for f in frames if isinstance(f, dict))
    assert content_of(frames) == "Hello world"


def test_reasoning_content_in_a_completion(client, fake):
    fake.play("thinking")
    message = client.chat().json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Hello", "Let me think. ")


def test_what_the_cli_is_started_with(client, fake, monkeypatch, tmp_path):
    fake.play("echo")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-billed")
    monkeypatch.chdir(tmp_path)
    seen = echo(client.chat(model="claude-opus-4", max_tokens=77, reasoning_effort="high",
                            messages=[{"role": "system", "content": "S1"}, {"role": "developer", "content": "S2"},
                                      {"role": "user", "content": "PROMPT-MARKER"}]))
    assert "PROMPT-MARKER" not in json.dumps(seen["argv"]) and "S1" not in json.dumps(seen["argv"])
    assert seen["argv"][-2:] == ["--model=opus", "--effort=high"] and "--tools=" in seen["argv"]
    assert sent(seen["stdin"])[0] == {"type": "control_request", "request_id": "init",
                                "request": {"subtype": "initialize", "systemPrompt": "S1\n\nS2",
                                            "sdkMcpServers": ["client"]}}
    assert sent(seen["stdin"])[1] == {"type": "user", "message": {"role": "user", "content": [
        {"type": "text", "text": "PROMPT-MARKER"}]}}
    assert (seen["env"]["CLAUDE_CODE_MAX_OUTPUT_TOKENS"], seen["env"]["CLAUDE_CODE_MAX_RETRIES"]) == ("77", "2")
    assert "ANTHROPIC_API_KEY" not in seen["env"]
    assert seen["cwd"] != str(tmp_path) and seen["cwd_files"] == []


def test_history_is_seeded_turn_by_turn(client, fake):
    fake.play("echo")
    seen = echo(client.chat(messages=[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                      {"role": "user", "content": "Q2"}, {"role": "user", "content": "Q2b"},
                                      {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"}]))
    lines = [(line["type"], line.get("shouldQuery"), [b["text"] for b in line["message"]["content"]])
             for line in seen["stdin"][1:] if line["type"] != "control_response"]  # (to the tool server)
    assert lines == [("user", False, ["Q1"]), ("assistant", None, ["A1"]), ("user", False, ["Q2", "Q2b"]),
                     ("assistant", None, ["A2"]), ("user", None, ["Q3"])]
    # Each assistant line was written only after the history turn before it had finished.
    order = [e.get("emitted") or e["stdin"]["type"] for e in fake.log()
             if "emitted" in e or "stdin" in e and e["stdin"]["type"] != "control_response"]
    assert order == ["control_request", "user", "history result", "assistant", "user", "history result",
                     "assistant", "user"]


def test_text_starting_with_a_slash_is_not_a_cli_command(client, fake):
    fake.play("echo")
    seen = echo(client.chat(messages=[{"role": "user", "content": "/cost"}]))
    assert seen["stdin"][1]["message"]["content"] == [{"type": "text", "text": "/"}, {"type": "text", "text": "cost"}]


def test_lone_surrogates_reach_the_cli_escaped(client, fake):
    fake.play("echo")
    raw = b'{"model": "sonnet", "messages": [{"role": "user", "content": "half an emoji \\ud83d"}]}'
    seen = echo(client.call("POST", "/v1/chat/completions", raw=raw))
    assert seen["stdin"][1]["message"]["content"][0]["text"] == "half an emoji \ud83d"


@pytest.mark.parametrize("scenario, status, code", [
    ("rate_limit", 429, "rate_limit_exceeded"),
    ("not_logged_in", 503, "claude_not_logged_in"),
    ("invalid_login", 503, "claude_not_logged_in"),
    ("overloaded", 503, "overloaded"),
    ("prompt_too_long", 400, "context_length_exceeded"),
    ("request_too_large", 413, "request_too_large"),
    ("model_not_found", 404, "model_not_found"),
    ("bad_request", 400, "invalid_request"),
    ("forbidden", 403, "permission_denied"),
    ("server_error", 502, "upstream_error"),
    ("garbage", 502, "cli_bad_output"),
    ("crash", 502, "cli_failed"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_claude_failures_become_http_errors(client, fake, scenario, status, code, stream):
    fake.play(scenario)
    reply = client.chat(stream=stream)  # nothing was sent yet, so a stream can still fail with a status
    assert (reply.status, reply.error["code"]) == (status, code)


def test_rate_limit_retry_after_is_the_windows_reset(client, fake):
    fake.play("rate_limit")
    reply = client.chat()
    assert reply.status == 429 and 110 <= int(reply.headers["retry-after"]) <= 120
    assert "slow down" in reply.error["message"]


def test_overloaded_has_retry_after(client, fake):
    fake.play("overloaded")
    assert client.chat().headers["retry-after"] == str(cmp.OVERLOADED_RETRY_SECONDS)


def test_not_logged_in_says_to_run_claude_and_log_in(client, fake):
    fake.play("not_logged_in")
    message = client.chat().error["message"]
    assert "run `claude`" in message and "log in" in message


def test_cli_dying_is_502_with_its_last_words(client, fake):
    fake.play("crash")
    message = client.chat().error["message"]
    assert "status 3" in message and "out of cheese" in message


@pytest.mark.parametrize("stream", [False, True])
def test_a_restarted_stream_is_not_duplicated(client, fake, stream):
    fake.play("drop_then_same")
    if stream:
        text = content_of(client.stream()[1])
    else:
        text = client.chat().json()["choices"][0]["message"]["content"]
    assert text == "Hello world"


def test_a_different_retry_ends_a_begun_stream_with_an_error_event(client, fake):
    fake.play("drop_then_different")
    reply, frames = client.stream()
    assert reply.status == 200 and content_of(frames) == "Partial "
    assert frames[-2]["error"]["code"] == "upstream_stream_restarted" and frames[-1] == "[DONE]"
    assert client.chat().json()["choices"][0]["message"]["content"] == "Something else"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_ends_the_text_and_interrupts_the_cli(client, fake, stream):
    fake.play("stop")
    text, finish = text_and_finish(client, stream, stop=["STOP"])
    assert (text, finish) == ("one two ", "stop")
    assert {"type": "control_request", "request_id": "stop", "request": {"subtype": "interrupt"}} in fake.stdin()


def test_max_tokens_ends_with_length_and_stops_the_clis_continuation(client, fake):
    fake.play("max_tokens")
    choice = client.chat(max_tokens=3).json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("truncated", "length")
    assert any(line["type"] == "control_request" and line["request"]["subtype"] == "interrupt"
               for line in fake.stdin())


def test_keep_alive_comments_while_claude_is_silent(client, fake, monkeypatch):
    monkeypatch.setattr(cmp, "KEEPALIVE_SECONDS", 0.2)
    fake.play("hold")
    _, frames = client.open_stream()
    assert next(frames)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert next(frames) == ": keep-alive"
    fake.release()
    assert content_of(frames) == "late"


def test_request_timeout_is_504_and_stops_the_cli(start_proxy, fake):
    fake.play("hang")
    proxy = start_proxy(timeout=0.5)
    reply = proxy.chat()
    assert (reply.status, reply.error["code"]) == (504, "timeout")
    assert wait_until(lambda: proxy.server.pool.running() == [])


def idle_counts() -> tuple:
    """This process's children, threads and open descriptors: what a proxy holds returns to these."""
    return len(find_children(os.getpid())), threading.active_count(), len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("moment", ["before the first token", "after the first token", "mid tool call",
                                    "with bytes unread"])
def test_disconnects_stop_the_cli_within_a_second_and_leave_nothing(start_proxy, fake, moment):
    fake.play({"after the first token": "token_then_hang", "mid tool call": "call_then_hang"}.get(moment, "hang"))
    client = start_proxy(spares=0)
    idle = idle_counts()
    body = json.dumps({"model": "sonnet", "messages": [USER], "stream": True, "tools": [WEATHER]}).encode()
    sock = socket.create_connection(("127.0.0.1", client.port))
    # More than the proxy reads ahead, so some stay in the socket.
    pipelined = CHAT_HEAD + b"Content-Length: 100000\r\n\r\n" + b" " * 100000 if moment == "with bytes unread" else b""
    sock.sendall(CHAT_HEAD + b"Content-Length: %d\r\n\r\n%s%s" % (len(body), body, pipelined))
    if moment in ("after the first token", "mid tool call"):
        seen = b""
        while b'"content": "first"' not in seen and b'"arguments": "{\\"ci"' not in seen:
            seen += sock.recv(65536)
    assert wait_until(lambda: len(client.server.pool.running()) == 1)
    [process] = client.server.pool.running()
    sock.close()
    gone_at = time.monotonic()
    assert wait_until(lambda: not pid_alive(process.popen.pid), timeout=1.0)
    assert time.monotonic() - gone_at < 1.0
    assert wait_until(lambda: client.server.pool.counts()["running"] == 0 and idle_counts() <= idle), idle_counts()


def test_a_client_that_leaves_mid_body_starts_no_cli(start_proxy, fake):
    client = start_proxy(spares=0)
    idle = idle_counts()
    with socket.create_connection(("127.0.0.1", client.port)) as sock:
        sock.sendall(CHAT_HEAD + b"Content-Length: 100\r\n\r\n{\"model\": ")
    assert wait_until(lambda: idle_counts() <= idle)
    assert fake.log() == [] and client.server.gate.running == 0


def test_clients_that_leave_the_queue_give_up_their_places_at_once(start_proxy, fake, monkeypatch):
    monkeypatch.setattr(cmp, "QUEUE_WAIT_SECONDS", 30)
    fake.play("hold")
    client = start_proxy(max_concurrency=1, spares=0)
    holder = threading.Thread(target=client.chat)
    holder.start()
    assert wait_until(lambda: len(client.server.pool.running()) == 1)
    body = json.dumps({"model": "sonnet", "messages": [USER]}).encode()
    leaving = [socket.create_connection(("127.0.0.1", client.port)) for _ in range(cmp.QUEUE_LENGTH)]
    for sock in leaving:
        sock.sendall(CHAT_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_until(lambda: client.server.gate.waiting == cmp.QUEUE_LENGTH)
    for sock in leaving:
        sock.close()
    assert wait_until(lambda: client.server.gate.waiting == 0, timeout=1.0)
    queued = threading.Thread(target=lambda: replies.append(client.chat()))
    replies = []
    queued.start()  # has a place in the queue, where the clients that left held them all
    assert wait_until(lambda: client.server.gate.waiting == 1)
    fake.release()
    holder.join(20)
    queued.join(20)
    assert [reply.status for reply in replies] == [200]
    assert len(pids(fake)) == 2  # the holder's CLI and the queued one's: none for the clients that left


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_gets_its_cli_stopped_within_a_second(client, fake, stream):
    fake.play("hang")
    conn = client.connect()
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "claude-sonnet-4", "messages": [USER], "stream": stream}),
                 {"Content-Type": "application/json"})
    assert wait_until(lambda: len(client.server.pool.running()) == 1)
    [process] = client.server.pool.running()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    gone_at = time.monotonic()
    assert wait_until(lambda: not pid_alive(process.popen.pid), timeout=1.0)
    assert time.monotonic() - gone_at < 1.0
    assert wait_until(lambda: client.server.pool.running() == [])


def test_busy_server_queues_briefly_then_answers_429(start_proxy, fake, monkeypatch):
    monkeypatch.setattr(cmp, "QUEUE_LENGTH", 1)
    monkeypatch.setattr(cmp, "QUEUE_WAIT_SECONDS", 30)
    fake.play("hold")
    proxy = start_proxy(max_concurrency=1, spares=0)
    replies = []
    first = threading.Thread(target=lambda: replies.append(proxy.chat()))
    first.start()
    assert wait_until(lambda: len(proxy.server.pool.running()) == 1)
    second = threading.Thread(target=lambda: replies.append(proxy.chat()))
    second.start()
    assert wait_until(lambda: proxy.call("GET", "/health").json()["queued"] == 1)
    health = proxy.call("GET", "/health").json()
    assert (health["in_flight"], health["queued"]) == (1, 1)
    third = proxy.chat()
    assert (third.status, third.error["code"]) == (429, "server_busy")
    assert third.headers["retry-after"] == str(cmp.BUSY_RETRY_SECONDS)
    fake.release()
    first.join(20)
    second.join(20)
    assert [r.status for r in replies] == [200, 200]


def test_queued_request_gives_up_with_429(start_proxy, fake, monkeypatch):
    monkeypatch.setattr(cmp, "QUEUE_WAIT_SECONDS", 0.2)
    fake.play("hold")
    proxy = start_proxy(max_concurrency=1)
    threading.Thread(target=proxy.chat, daemon=True).start()
    assert wait_until(lambda: len(proxy.server.pool.running()) == 1)
    assert proxy.chat().status == 429


def test_health(client):
    body = client.call("GET", "/health").json()
    assert body == {"status": "ok", "claude_version": "2.1.329", "in_flight": 0, "queued": 0,
                    "processes": {"running": 0, "live": 0, "held": 0, "spare": 0, "limit": 8},
                    "usage": client.call("GET", "/v1/usage").json()}
    assert body["usage"]["windows"] is None


def metric_samples(text: str) -> dict:
    """{(name, frozenset of label pairs): value} of a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_and_labels, value = line.rsplit(" ", 1)
            name, _, labels = name_and_labels.partition("{")
            pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)
            samples[name, frozenset(pairs)] = float(value)
    return samples


def check_with_promtool(text: str):
    """Prometheus's own linter on an exposition: CI installs it (.ci/run sets CI); elsewhere, if it is here."""
    if not shutil.which("promtool"):
        assert not os.environ.get("CI"), "promtool is missing: CI installs Debian's package prometheus"
        return
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked


def test_metrics_count_requests_tokens_latency_and_processes(start_proxy):
    proxy = start_proxy(api_key="k")
    key = {"Authorization": "Bearer k"}
    assert proxy.call("GET", "/metrics").status == 401  # the API's own rule
    assert proxy.chat(headers=key).status == 200
    reply, frames = proxy.open_stream(headers=key)
    list(frames)
    assert proxy.chat(headers=key, model="gpt-nope").status == 404
    counted = lambda: metric_samples(proxy.call("GET", "/metrics", headers=key).text).get(  # noqa: E731
        ("claude_max_proxy_request_duration_seconds_count", frozenset({("endpoint", "/v1/chat/completions")})))
    assert wait_until(lambda: counted() == 3)  # each is counted once its answer is out
    scrape = proxy.call("GET", "/metrics", headers=key)
    assert scrape.status == 200 and scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = metric_samples(scrape.text)
    chat = ("endpoint", "/v1/chat/completions")
    assert samples["claude_max_proxy_requests_total", frozenset(
        {chat, ("model", "claude-sonnet-4"), ("status", "200")})] == 2
    assert samples["claude_max_proxy_requests_total", frozenset({chat, ("model", "gpt-nope"), ("status", "404")})] == 1
    assert samples["claude_max_proxy_request_duration_seconds_count", frozenset({chat})] == 3
    assert samples["claude_max_proxy_request_duration_seconds_bucket", frozenset({chat, ("le", "+Inf")})] == 3
    assert samples["claude_max_proxy_time_to_first_token_seconds_count", frozenset({chat})] == 1  # the stream
    assert samples["claude_max_proxy_tokens_total", frozenset({("kind", "output")})] > 0
    assert samples["claude_max_proxy_cli_starts_total", frozenset()] >= 2
    assert samples["claude_max_proxy_cli_processes_limit", frozenset()] == 8
    assert ("claude_max_proxy_cli_processes", frozenset({("state", "running")})) in samples
    check_with_promtool(scrape.text)


def test_metrics_labels_are_escaped_and_models_bounded():
    metrics = cmp.Metrics()
    for number in range(cmp.MODEL_LABELS + 5):
        metrics.request_done("/v1/chat/completions", f'm{number}"\\\n', 400, 0.01, None, None, "-")
    text = metrics.render({"running": 0, "live": 0, "held": 0, "spare": 0, "limit": 8}, 0, 0, 0, None, 0)
    models = {dict(labels)["model"] for name, labels in metric_samples(text) if name.endswith("requests_total")}
    assert len(models) == cmp.MODEL_LABELS + 1 and "other" in models
    assert 'model="m0\\"\\\\\\n"' in text


def test_metrics_show_the_usage_windows(start_real_proxy, upstream):
    upstream.headers = unified_headers("allowed_warning", 0.87, 3600)
    proxy = start_real_proxy()
    assert proxy.chat().status == 200
    text = proxy.call("GET", "/metrics").text
    samples = metric_samples(text)
    assert samples["claude_max_proxy_usage_window_utilization", frozenset({("window", "five_hour")})] == 0.87
    assert samples["claude_max_proxy_usage_window_utilization", frozenset({("window", "seven_day")})] == 0.41
    assert samples["claude_max_proxy_usage_window_reset_timestamp_seconds", frozenset(
        {("window", "five_hour")})] == int(upstream.headers["anthropic-ratelimit-unified-5h-reset"])
    assert samples["claude_max_proxy_extra_usage_in_use", frozenset()] == 0
    check_with_promtool(text)


def test_status_page_is_one_self_contained_page_without_data(start_proxy):
    proxy = start_proxy(api_key="k")
    page = proxy.call("GET", "/")  # no key: the page asks for it
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert not re.search(r"\b(src|href)=|<link|@import|url\(|https?://", page.text)  # works offline
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "'unsafe-inline'" not in \
        policy.split("script-src")[1]
    digest = base64.b64encode(hashlib.sha256(cmp.STATUS_SCRIPT.encode()).digest()).decode()
    assert f"<script>{cmp.STATUS_SCRIPT}</script>" in page.text and f"'sha256-{digest}'" in policy
    assert "sessionStorage" in page.text and "Authorization" in page.text


def test_status_data_needs_the_key_and_lists_requests_without_their_text(start_proxy):
    proxy = start_proxy(api_key="k")
    key = {"Authorization": "Bearer k"}
    assert proxy.call("GET", "/v1/status").status == 401
    secret = "my secret prompt"
    assert proxy.chat(headers=key, messages=[{"role": "user", "content": secret}]).status == 200
    assert wait_until(lambda: proxy.call("GET", "/v1/status", headers=key).json()["recent"])  # listed once sent
    status = proxy.call("GET", "/v1/status", headers=key)  # as the page asks: a same-origin GET has no Origin
    body = status.json()
    assert secret not in status.text and "Hello" not in status.text
    assert body["recent"] == [{"time": body["recent"][0]["time"], "endpoint": "/v1/chat/completions",
                               "model": "claude-sonnet-4", "status": 200, "tokens": "132+3",
                               "duration": body["recent"][0]["duration"], "served": "cold"}]
    assert set(body) == {"claude_version", "in_flight", "queued", "processes", "usage", "recent"}
    assert proxy.call("GET", "/v1/status", headers={**key, "Origin": "http://evil.example"}).status == 403


def test_models(client):
    listing = client.call("GET", "/v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["claude-opus-4", "claude-sonnet-4", "claude-haiku-4",
                                                  "opus", "sonnet", "haiku"]
    assert all(m["object"] == "model" and m["owned_by"] == "anthropic" for m in listing["data"])
    assert client.call("GET", "/models").json() == listing
    assert client.call("GET", "/v1/models/openai%2Fclaude-opus-4").json()["id"] == "openai/claude-opus-4"
    assert client.call("GET", "/v1/models/claude-sonnet-4-5-20250929").status == 200
    missing = client.call("GET", "/v1/models/gpt-4o")
    assert missing.status == 404 and missing.error["code"] == "model_not_found"


def test_routes_work_without_the_v1_prefix(client):
    assert client.call("POST", "/chat/completions", {"model": "sonnet", "messages": [USER]}).status == 200


@pytest.mark.parametrize("path, route, item", [
    ("/v1/chat/completions", "/v1/chat/completions", ""), ("/chat/completions/", "/v1/chat/completions", ""),
    ("/health", "/health", ""), ("/v1/health", "/health", ""), ("/v1/models", "/v1/models", ""),
    ("/models/openai%2Fclaude-opus-4", "/v1/models/{id}", "openai/claude-opus-4"),
    ("/v1/responses/resp_1", "/v1/responses/{id}", "resp_1"), ("/v1/responses", "/v1/responses", ""),
    ("/v1", None, ""), ("/", "/", ""), ("/v1/models/", "/v1/models", ""), ("/v2/models", None, ""),
    ("/metrics", "/metrics", ""), ("/usage", "/v1/usage", ""), ("/v1/status", "/v1/status", ""), ("", None, ""),
])
def test_paths_match_their_route(path, route, item):
    assert cmp.match_route(path) == (route, item)


def test_the_routes_table_names_every_route_and_method(client):
    missing = client.call("GET", "/v1/nothing-here")
    assert all(route in missing.error["message"] for route in cmp.ROUTES)
    assert "GET/DELETE /v1/responses/{id}" in missing.error["message"]
    unknown = client.call("BREW", "/v1/models")
    assert unknown.headers["allow"] == "GET, POST, DELETE, OPTIONS" == ", ".join(cmp.METHODS)


@pytest.mark.parametrize("method, path, body, raw, status, code", [
    ("POST", "/v1/chat/completions", None, b"{not json", 400, "invalid_json"),
    ("POST", "/v1/chat/completions", None, b"[" * 100_000, 400, "invalid_json"),
    ("POST", "/v1/chat/completions", [1, 2], None, 400, None),
    ("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": [USER]}, None, 404, "model_not_found"),
    ("POST", "/v1/chat/completions", None, b'{"model": "gpt\\udfff", "messages": []}', 404, "model_not_found"),
    ("GET", "/v1/nothing-here", None, None, 404, "unknown_route"),
    ("GET", "/v1/chat/completions", None, None, 405, "method_not_allowed"),
    ("DELETE", "/v1/models", None, None, 405, "method_not_allowed"),
    ("BREW", "/v1/models", None, None, 405, "method_not_allowed"),
])
def test_http_errors_use_openais_envelope(client, method, path, body, raw, status, code):
    reply = client.call(method, path, body, raw=raw)
    assert reply.status == status and reply.error["code"] == code
    assert reply.error["message"]


def test_wrong_method_says_which_is_allowed(client):
    reply = client.call("GET", "/v1/chat/completions")
    assert reply.headers["allow"] == "POST" and "/v1/chat/completions" in reply.error["message"]


def test_body_over_the_limit_is_413_and_without_length_411(client, monkeypatch):
    monkeypatch.setattr(cmp, "MAX_BODY_BYTES", 1000)
    reply = client.chat(messages=[{"role": "user", "content": "x" * 2000}])
    assert (reply.status, reply.error["code"]) == (413, "request_too_large")
    conn = client.connect()
    conn.putrequest("POST", "/v1/chat/completions")
    conn.endheaders()
    assert conn.getresponse().status == 411


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        return sock.makefile("rb").read()


def parsed_answer(answer: bytes) -> tuple:
    """(status, headers, JSON body) of one whole HTTP/1.1 answer, checked for its framing."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines)}
    assert version == "HTTP/1.1" and len(body) == int(headers["content-length"]), answer
    return int(status), headers, json.loads(body)


MANY_HEADERS = b"".join(b"X-%d: y\r\n" % i for i in range(101))
CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health\r\n\r\n", 505),                                # HTTP/0.9
    (b"GET /health HTTP/2.0\r\n\r\n", 505),
    (b"GET /health http/1.1\r\n\r\n", 400),
    (b"GET /health HTTP/1.1x\r\n\r\n", 400),
    (b"GET /health HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET http://[/v1/models HTTP/1.1\r\n\r\n", 400),
    (b"GET /v1/\x1b[31mmodels HTTP/1.1\r\n\r\n", 400),
    (b"GET /v1/mod\xe9ls HTTP/1.1\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"BREW /v1/models HTTP/1.1\r\n\r\n", 405),
    (b"GET /health HTTP/1.1\r\n" + MANY_HEADERS + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"y" * 70000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n", 400),
    (CHAT_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
    (CHAT_HEAD + b"Content-Length: -1\r\n\r\n", 400),
    (CHAT_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    (CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
    (CHAT_HEAD + b"\r\n", 411),
])
def test_malformed_http_gets_an_http_answer_and_a_closed_connection(client, request_bytes, status):
    answer = raw_exchange(client.port, request_bytes)
    assert parsed_answer(answer)[0] == status, answer[:300]
    got_status, headers, body = parsed_answer(answer)
    assert headers["connection"] == "close" and set(body["error"]) == {"message", "type", "param", "code"}
    assert client.call("GET", "/health").status == 200


def test_blank_lines_before_a_request_are_skipped(client):
    assert parsed_answer(raw_exchange(client.port, b"\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n"))[0] == 200


@pytest.mark.parametrize("head", [b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: 123456789",
                                  CHAT_HEAD + b"Content-Length: 50\r\n\r\n{\"model\": \"sonnet\", \"mess"])
def test_a_client_trickling_its_headers_or_body_gets_a_408_on_time(start_proxy, head):
    client = start_proxy(read_timeout=0.6)
    with socket.create_connection(("127.0.0.1", client.port)) as sock:
        started = time.monotonic()
        sock.sendall(head[:-10])
        try:
            for byte in head[-10:]:  # a byte every 0.1 s: each read is quick, the phase is not
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass  # the proxy has answered and closed
        answer = sock.makefile("rb").read()
    assert parsed_answer(answer)[2]["error"]["code"] == "request_timeout"
    assert 0.6 <= time.monotonic() - started < 3


def test_a_client_that_stops_reading_its_stream_loses_its_cli_within_timeout(start_proxy, fake):
    fake.play("flood")
    client = start_proxy(timeout=1.5, spares=0)
    with socket.create_connection(("127.0.0.1", client.port)) as sock:
        body = json.dumps({"model": "sonnet", "stream": True, "messages": [USER]}).encode()
        sock.sendall(CHAT_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        started = time.monotonic()  # and never read: the socket's buffers fill, and the proxy's writes stall
        assert wait_until(lambda: fake.log())
        [cli] = pids(fake)
        assert wait_until(lambda: not pid_alive(cli), timeout=10)
        assert time.monotonic() - started < 1.5 + 3
        assert wait_until(lambda: client.server.pool.counts()["running"] == 0 and client.server.gate.running == 0)


def test_a_client_that_resets_mid_body_is_logged_in_one_line_without_a_traceback(client, caplog):
    import struct
    caplog.set_level("INFO", logger="claude-max-proxy")
    with socket.create_connection(("127.0.0.1", client.port)) as sock:
        sock.sendall(CHAT_HEAD + b"Content-Length: 100\r\n\r\n{\"model\": ")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends a reset
    assert wait_until(lambda: any(" 499 " in r.getMessage() for r in caplog.records))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_control_characters_from_a_request_never_reach_the_log_raw(client, caplog):
    caplog.set_level("DEBUG", logger="claude-max-proxy")
    raw_exchange(client.port, b"G\x1bT /v1/\x1b]0;owned\x07 HTTP/1.1\r\n\r\n")
    raw_exchange(client.port, b"GET /v1/models/%1b%5b31m HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert wait_until(lambda: len([r for r in caplog.records if " id=" in r.getMessage()]) >= 2)
    assert not any(char in record.getMessage() for record in caplog.records for char in "\x1b\x07")


def test_an_idle_connection_between_requests_is_not_timed_out_by_read_timeout(start_proxy):
    client = start_proxy(read_timeout=0.2)
    conn = client.connect()
    conn.request("GET", "/health")
    assert conn.getresponse().read()
    time.sleep(0.5)  # idle, which is --read-timeout's business only once a request has begun
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_an_error_before_the_body_is_read_does_not_poison_the_connection(client):
    body = json.dumps({"model": "x", "input": "y" * 5000}).encode()
    answer_bytes = raw_exchange(client.port, b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" % (len(body), body))
    # One answer, and the connection closed: the unread body was not taken for a request.
    assert answer_bytes.count(b"HTTP/1.1 ") == 1 and answer_bytes.startswith(b"HTTP/1.1 404")
    assert b"Connection: close" in answer_bytes


def test_after_a_stream_the_connection_serves_the_next_request(client):
    conn = client.connect()
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "sonnet", "stream": True, "messages": [USER]}),
                 {"Content-Type": "application/json"})
    assert b"[DONE]" in conn.getresponse().read()
    conn.request("BREW", "/v1/models")  # refused by http.server itself, on the same connection
    reply = conn.getresponse()
    assert reply.status == 405 and json.loads(reply.read())["error"]["code"] == "method_not_allowed"


def test_non_ascii_content_length_is_a_400(client):
    head = raw_exchange(client.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Content-Length: \xb2\r\n\r\n").partition(b"\r\n")[0]
    assert head == b"HTTP/1.1 400 Bad Request"


def deep_json(depth: int) -> str:
    """JSON nested `depth` levels, as text: json.dumps would recurse past its own limit first."""
    return '{"a": ' * depth + "1" + "}" * depth


def body_with(body: dict, deep: str) -> bytes:
    """body, with the string "DEEP" in it replaced by raw JSON."""
    return json.dumps(body).replace('"DEEP"', deep).encode()


CHAT = {"model": "sonnet", "messages": [USER]}
FUNCTION = {"type": "function", "function": {"name": "f", "parameters": "DEEP"}}
DEEP_BODIES = {
    "response_format.json_schema.schema": ("/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": "DEEP"}}}),
    "tools[0].function.parameters": ("/v1/chat/completions", {**CHAT, "tools": [FUNCTION]}),
    "metadata": ("/v1/responses", {"model": "sonnet", "input": "hi", "metadata": "DEEP"}),
    "tools[0].filters": ("/v1/responses", {"model": "sonnet", "input": "hi", "tools": [
        {"type": "web_search", "filters": "DEEP"}]}),
}


@pytest.mark.parametrize("depth", [cmp.MAX_NESTING + 1, 900])  # 900: just under the parser's limit
@pytest.mark.parametrize("where", DEEP_BODIES)
def test_deep_json_is_a_400_naming_where_and_starts_no_cli(start_proxy, fake, where, depth):
    client = start_proxy(spares=0)
    path, body = DEEP_BODIES[where]
    reply = client.call("POST", path, raw=body_with(body, deep_json(depth)))
    assert (reply.status, reply.error["code"]) == (400, "nested_too_deeply")
    assert reply.error["param"].startswith(where)
    assert fake.log() == [] and client.server.pool.counts()["running"] == 0


def test_deep_json_in_a_tool_calls_arguments_is_a_400(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": deep_json(150)}}
    reply = client.chat(messages=[USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": "call_1", "content": "ok"}])
    assert reply.status == 400 and reply.error["param"].startswith("messages[1].tool_calls[0].function.arguments")


def test_json_as_deep_as_allowed_is_served(client):
    reply = client.call("POST", "/v1/chat/completions", raw=body_with({**CHAT, "tools": [FUNCTION]}, deep_json(90)))
    assert reply.status == 200


def test_a_cli_whose_start_fails_after_it_was_spawned_is_stopped_and_uncounted(start_proxy, fake, monkeypatch):
    def broken(session):
        raise RuntimeError("a bug after the spawn")
    monkeypatch.setattr(cmp, "initialize_line", broken)
    client = start_proxy(spares=0)
    assert client.chat().status == 500
    assert wait_until(lambda: fake.log())
    assert wait_until(lambda: not any(pid_alive(pid) for pid in pids(fake)))
    assert client.server.pool.counts() == {"running": 0, "live": 0, "held": 0, "spare": 0, "limit": 8}


def test_a_finished_turn_lets_the_cli_exit_by_itself_and_leaves_nothing(start_proxy, fake):
    before = set(Path(tempfile.gettempdir()).glob("claude-max-proxy-*"))
    client = start_proxy(conversations=0, spares=0)  # nothing kept: the turn's CLI is stopped at its end
    assert client.chat().status == 200
    assert wait_until(lambda: {"eof": True} in [{k: v for k, v in e.items() if k != "pid"} for e in fake.log()])
    assert wait_until(lambda: client.server.pool.counts()["running"] == 0)
    assert set(Path(tempfile.gettempdir()).glob("claude-max-proxy-*")) <= before


def test_what_the_cli_started_is_stopped_with_it(start_proxy, fake):
    fake.play("helper")
    proxy = start_proxy(timeout=0.5)
    assert proxy.chat().status == 504
    [helper] = [entry["helper"] for entry in fake.log() if "helper" in entry]
    assert wait_until(lambda: not pid_alive(helper))


def test_a_request_queued_before_shutdown_starts_no_cli(start_proxy, fake, monkeypatch):
    started = []
    monkeypatch.setattr(cmp, "ClaudeProcess", lambda *args: started.append(args) or ClaudeProcess(*args))
    fake.play("hold")
    proxy = start_proxy(max_concurrency=1, spares=0)
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(proxy.chat())) for _ in range(2)]
    threads[0].start()
    assert wait_until(lambda: len(proxy.server.pool.running()) == 1)
    threads[1].start()
    assert wait_until(lambda: proxy.server.gate.waiting == 1)
    proxy.server.stopping.set()  # as drain_and_close() does first
    fake.release()
    for thread in threads:
        thread.join(20)
    assert sorted(r.status for r in replies) == [200, 503]
    assert len(started) == 1


def test_api_key_is_required_everywhere_but_health(start_proxy):
    proxy = start_proxy(api_key="sekrit")
    assert proxy.call("GET", "/health").status == 200
    missing = proxy.call("GET", "/v1/models")
    assert (missing.status, missing.error["code"]) == (401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert proxy.call("GET", "/v1/models", headers={"Authorization": "Bearer wrong"}).status == 401
    assert proxy.chat().status == 401
    assert proxy.call("GET", "/v1/models", headers={"Authorization": "Bearer sekrit"}).status == 200
    assert proxy.chat(headers={"Authorization": "Bearer sekrit"}).status == 200


def test_no_cors_unless_asked_and_foreign_origins_are_refused(client):
    reply = client.call("GET", "/v1/models", headers={"Origin": "https://evil.example"})
    assert reply.status == 403 and "access-control-allow-origin" not in reply.headers
    assert reply.error["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in client.call("GET", "/v1/models").headers


def test_cors_preflight_for_named_origins(start_proxy):
    proxy = start_proxy(cors_origins=("http://localhost:8080",), api_key="k")
    requested = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    reply = proxy.call("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://localhost:8080", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": requested})
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == "http://localhost:8080"
    assert reply.headers["access-control-allow-headers"] == requested
    assert "POST" in reply.headers["access-control-allow-methods"]
    models = proxy.call("GET", "/v1/models", headers={"Origin": "http://localhost:8080",
                                                      "Authorization": "Bearer k"})
    assert models.headers["access-control-allow-origin"] == "http://localhost:8080"


@pytest.mark.parametrize("host, allowed", [
    ("localhost:3456", True), ("127.0.0.1", True), ("[::1]:3456", True), ("app.localhost", True),
    ("evil.example", False), ("evil.example:3456", False), ("192.168.1.5", False),
    ("localhost:3456@evil.example", False), ("localhost:evil.example", False), ("localhost:3456:1", False),
    ("[::1]evil.example", False), ("localhost/evil", False), ("127.0.0.1 evil.example", False),
])
def test_dns_rebinding_hosts_are_refused_on_loopback(host, allowed):
    assert cmp.host_allowed(host, Config()) is allowed


def test_allowed_host_option_and_the_403(start_proxy):
    refused = start_proxy().call("GET", "/health", headers={"Host": "box.lan"})
    assert (refused.status, refused.error["code"]) == (403, "host_not_allowed")
    assert start_proxy(allowed_hosts=("box.lan",)).call("GET", "/health", headers={"Host": "box.lan"}).status == 200
    assert cmp.host_allowed("anything", Config(host="0.0.0.0"))


def test_access_log_has_one_line_per_request_and_no_prompt_text(client, caplog):
    caplog.set_level("INFO", logger="claude-max-proxy")
    reply = client.chat(messages=[{"role": "user", "content": "SECRET-PROMPT"}],
                        headers={"x-request-id": "req-123"})
    assert reply.headers["x-request-id"] == "req-123"
    # The line is written once the response is out, so the client may see the reply first.
    assert wait_until(lambda: any("/v1/chat/completions" in r.getMessage() for r in caplog.records))
    [line] = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert line.startswith("POST /v1/chat/completions 200 model=claude-sonnet-4 tokens=132+3 ")
    assert line.endswith("id=req-123")
    assert not any("SECRET-PROMPT" in r.getMessage() or "Hello world" in r.getMessage()
                   for r in caplog.records)


# Function calling and structured output, with the fake `claude`.

TOOL_REQUEST = {"tools": [WEATHER, CLOCK], "messages": [{"role": "user", "content": "Weather in Zürich?"}]}
ZURICH = '{"city": "Z\\u00fcrich"}'  # as Claude wrote it, escape and all


def replies_to(fake, prefix) -> list:
    """What the proxy answered to the fake CLI's control requests whose ids start with `prefix`."""
    return [line["response"] for line in fake.stdin()
            if line["type"] == "control_response" and line["response"]["request_id"].startswith(prefix)]


def test_tools_reach_claude_as_the_client_defined_them(client, fake):
    fake.play("tool_calls")
    assert client.chat(**TOOL_REQUEST).status == 200
    listed = replies_to(fake, "mcp-3")[0]["response"]["mcp_response"]["result"]["tools"]
    whole = {"anthropic/maxResultSizeChars": cmp.MAX_RESULT_CHARS}  # results up to this size reach Claude whole
    assert listed == [{"name": "get_weather", "description": "Weather for a city.",
                       "inputSchema": WEATHER["function"]["parameters"], "_meta": whole},
                      {"name": "get_time", "description": "", "inputSchema": {"type": "object", "properties": {}},
                       "_meta": whole}]
    argv = fake.log()[0]["argv"]
    assert "--tools=" in argv and "--permission-prompt-tool=stdio" in argv


def test_the_tool_server_answers_a_line_the_cli_wrote_in_two_reads(client, fake, monkeypatch):
    monkeypatch.setenv("FAKE_CLAUDE_SPLIT_LINES", "1")
    fake.play("tool_calls")
    body = client.chat(**TOOL_REQUEST).json()
    assert [call["function"]["name"] for call in body["choices"][0]["message"]["tool_calls"]] == [
        "get_weather", "get_time"]
    assert [tool["name"] for tool in replies_to(fake, "mcp-3")[0]["response"]["mcp_response"]["result"]["tools"]] \
        == ["get_weather", "get_time"]


def test_tool_calls_come_back_in_openai_shape(start_proxy, fake):
    fake.play("tool_calls")
    client = start_proxy(conversations=0)  # no turn is kept waiting for the results: the runs are refused
    body = client.chat(**TOOL_REQUEST).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ZURICH}},
        {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    assert body["usage"]["completion_tokens"] == 20
    # The run is refused, and only once Claude's message is complete.
    assert [reply["response"]["behavior"] for reply in replies_to(fake, "perm-")] == ["deny"]
    assert replies_to(fake, "perm-")[0]["response"]["interrupt"] is True
    assert not any("answered_early" in entry for entry in fake.log())


def test_tool_calls_stream_fragment_by_fragment(client, fake):
    fake.play("tool_calls")
    _, frames = client.stream(stream_options={"include_usage": True}, **TOOL_REQUEST)
    chunks = [f for f in frames if isinstance(f, dict) and f["choices"]]
    fragments = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [f["index"] for f in fragments] == [0, 0, 0, 0, 0, 1, 1]
    assert [f for f in fragments if "id" in f] == [
        {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]
    assert all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"}
               for f in fragments if "id" not in f)
    assert [f["function"]["arguments"] for f in fragments if f["index"] == 0][1:] == ['{"ci', 'ty": "Z\\u00', 'fcrich"', "}"]
    assert "".join(f["function"]["arguments"] for f in fragments if f["index"] == 1) == "{}"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert frames[-2]["usage"]["completion_tokens"] == 20 and frames[-1] == "[DONE]"


def test_parallel_tool_calls_false_returns_the_first_call_only(client, fake):
    fake.play("tool_calls")
    message = client.chat(parallel_tool_calls=False, **TOOL_REQUEST).json()["choices"][0]["message"]
    assert [call["id"] for call in message["tool_calls"]] == ["toolu_1"]


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_functions_get_a_function_call(client, fake, stream):
    fake.play("tool_calls")
    body = {"functions": [WEATHER["function"], CLOCK["function"]], "messages": TOOL_REQUEST["messages"]}
    if not stream:
        choice = client.chat(**body).json()["choices"][0]
        assert choice["finish_reason"] == "function_call"
        assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": ZURICH}
        return
    _, frames = client.stream(**body)
    deltas = [f["choices"][0]["delta"] for f in frames if isinstance(f, dict)]
    calls = [delta["function_call"] for delta in deltas if "function_call" in delta]
    assert calls[0] == {"name": "get_weather", "arguments": ""}
    assert "".join(call["arguments"] for call in calls) == ZURICH
    assert [f["choices"][0]["finish_reason"] for f in frames if isinstance(f, dict)][-1] == "function_call"


def test_a_call_made_without_streaming_is_refused_at_once(start_proxy, fake):
    fake.play("tool_call_unstreamed")
    choice = start_proxy(timeout=10).chat(**TOOL_REQUEST).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [call["function"] for call in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    bash, weather = [reply["response"] for reply in replies_to(fake, "perm-")]
    assert (bash["behavior"], bash["interrupt"]) == ("deny", False)  # Claude is told; the turn goes on
    assert (weather["behavior"], weather["interrupt"]) == ("deny", True)


def test_tool_choice_none_offers_no_tools(client, fake):
    fake.play("echo")
    assert sent(echo(client.chat(tool_choice="none", **TOOL_REQUEST))["stdin"])[0]["request"]["subtype"] == \
        "initialize"
    assert replies_to(fake, "mcp-3")[0]["response"]["mcp_response"]["result"]["tools"] == []


def test_a_named_function_is_the_only_one_offered(client, fake):
    fake.play("echo")
    seen = echo(client.chat(tool_choice={"type": "function", "function": {"name": "get_time"}}, **TOOL_REQUEST))
    assert "`get_time`" in sent(seen["stdin"])[0]["request"]["systemPrompt"]
    listed = replies_to(fake, "mcp-3")[0]["response"]["mcp_response"]["result"]["tools"]
    assert [tool["name"] for tool in listed] == ["get_time"]


def test_a_follow_up_seeds_the_call_and_its_result(client, fake):
    fake.play("echo")
    seen = echo(client.chat(tools=[WEATHER], messages=[USER, CALL, RESULT, {"role": "user", "content": "So?"}]))
    assistant, prompt = [line for line in seen["stdin"] if line["type"] in ("assistant", "user")][1:]
    assert assistant["message"]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Rome"}}]
    assert prompt["message"]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": texts("sunny")},
                                            {"type": "text", "text": "So?"}]
    assert seen["env"]["CLAUDE_CODE_DISABLE_THINKING"] == "1"


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "Person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("response_format", [SCHEMA_FORMAT, {"type": "json_object"}])
@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_is_the_json_claude_produced(client, fake, response_format, stream):
    fake.play("structured")
    content, finish = text_and_finish(client, stream, response_format=response_format)
    assert (content, finish) == ('{"name":"Alice"}', "stop")
    schema = response_format.get("json_schema", {}).get("schema", {"type": "object"})
    assert sent(fake.stdin())[0]["request"]["jsonSchema"] == schema


def test_a_tool_schema_the_cli_rejects_is_a_400(client, fake):
    fake.play("drops_tools")
    reply = client.chat(**TOOL_REQUEST)
    assert (reply.status, reply.error["code"], reply.error["param"]) == (400, "invalid_tool_schema", "tools")
    assert "get_time" in reply.error["message"]



# The Responses API, with the fake `claude`.

def test_a_response(client):
    reply = client.respond(instructions="Be brief.", metadata={"k": "v"})
    body = reply.json()
    assert reply.status == 200 and body["object"] == "response" and body["id"].startswith("resp_")
    assert (body["status"], body["output_text"], body["model"]) == ("completed", "Hello world", "claude-sonnet-4")
    assert (body["instructions"], body["metadata"], body["store"]) == ("Be brief.", {"k": "v"}, True)
    assert [(item["type"], item["role"], item["content"][0]["text"]) for item in body["output"]] == [
        ("message", "assistant", "Hello world")]
    assert body["usage"]["input_tokens"] == 132 and body["usage"]["output_tokens"] == 3


def test_a_response_stream_is_named_events_without_done(client, fake):
    fake.play("thinking")
    reply, events = client.respond_streaming()
    assert reply.status == 200 and reply.getheader("Content-Type").startswith("text/event-stream")
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed"
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == "Hello"
    assert "".join(d["delta"] for n, d in events if n == "response.reasoning_summary_text.delta") == "Let me think. "


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_in_a_response(client, fake, stream):
    fake.play("tool_calls")
    tools = [dict(WEATHER["function"], type="function"), dict(CLOCK["function"], type="function")]
    if stream:
        _, events = client.respond_streaming(tools=tools, input="Weather in Zürich?")
        output = events[-1][1]["response"]["output"]
        assert "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta") == ZURICH + "{}"
    else:
        output = client.respond(tools=tools, input="Weather in Zürich?").json()["output"]
    assert [item["type"] for item in output] == ["message", "function_call", "function_call"]
    assert [(item["call_id"], item["name"], item["arguments"]) for item in output[1:]] == [
        ("call_1", "get_weather", ZURICH), ("call_2", "get_time", "{}")]


def test_previous_response_id_supplies_the_conversation(start_proxy, fake):
    fake.play("tool_calls")
    client = start_proxy(conversations=0)  # the stored conversation is replayed into a new CLI
    tools = [dict(WEATHER["function"], type="function")]
    first = client.respond(tools=tools, instructions="Be brief.", input="Weather in Zürich?").json()
    call = first["output"][1]
    fake.play("echo")
    follow_up = client.respond(tools=tools, previous_response_id=first["id"], instructions="Be brief.",
                               input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}])
    seen = json.loads(follow_up.json()["output_text"])
    turns = [line["message"]["content"] for line in seen["stdin"] if line["type"] in ("user", "assistant")]
    assert turns[0] == [{"type": "text", "text": "Weather in Zürich?"}]
    assert turns[1][0] == {"type": "text", "text": "Let me check."}
    assert [(b["id"], b["name"]) for b in turns[1][1:]] == [("call_1", "get_weather")]  # get_time was not offered
    assert turns[2] == [{"type": "tool_result", "tool_use_id": "call_1", "content": texts("sunny")}]
    assert follow_up.json()["previous_response_id"] == first["id"]


def test_previous_response_id_of_an_unknown_response_is_a_404(client):
    reply = client.respond(previous_response_id="resp_nope")
    assert (reply.status, reply.error["code"], reply.error["param"]) == (404, "response_not_found",
                                                                          "previous_response_id")


def test_stored_responses_can_be_read_and_deleted(client):
    kept = client.respond().json()
    assert client.call("GET", f"/v1/responses/{kept['id']}").json() == kept
    assert client.call("DELETE", f"/v1/responses/{kept['id']}").json() == {
        "id": kept["id"], "object": "response", "deleted": True}
    assert client.call("GET", f"/v1/responses/{kept['id']}").status == 404
    unkept = client.respond(store=False).json()
    assert client.call("GET", f"/v1/responses/{unkept['id']}").status == 404
    wrong = client.call("PUT", f"/v1/responses/{kept['id']}")
    assert (wrong.status, wrong.headers["allow"]) == (405, "GET, DELETE")


def test_a_response_without_streaming_is_the_retry_alone(client, fake):
    fake.play("drop_then_same")  # "Hello " is sent, dropped, then "Hello world" comes again
    assert client.respond().json()["output_text"] == "Hello world"


def test_a_response_that_fails_before_streaming_keeps_its_status(client, fake):
    fake.play("rate_limit")
    reply, events = client.respond_streaming()
    assert reply.status == 429 and events == []


def test_a_response_that_fails_mid_stream_ends_with_response_failed(client, fake):
    fake.play("drop_then_different")
    reply, events = client.respond_streaming()
    assert reply.status == 200
    assert [name for name, _ in events][-2:] == ["response.output_text.delta", "response.failed"]
    assert events[-1][1]["response"]["error"]["type"] == "upstream_stream_restarted"


# Warm spares and live conversations, with the fake `claude`.

Q1, Q2 = {"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}
A1 = {"role": "assistant", "content": "Hello world"}  # what the `text` scenario answers


def processes(client) -> dict:
    return client.call("GET", "/health").json()["processes"]


def served(caplog, count) -> list:
    """How each of the first `count` requests got its CLI, once all are logged (just after each reply)."""
    def logged():
        return [re.search(r"served=(\S+)", r.getMessage())[1] for r in caplog.records
                if "served=" in r.getMessage() and "/health" not in r.getMessage()]
    assert wait_until(lambda: len(logged()) >= count), logged()
    return logged()[:count]


def pids(fake) -> list:
    """Each fake CLI that has started, in the order they started."""
    return list(dict.fromkeys(entry["pid"] for entry in fake.log()))


def started(fake, count) -> list:
    """The pids of the first `count` fake CLIs, once that many have started."""
    assert wait_until(lambda: len(pids(fake)) >= count), pids(fake)
    return pids(fake)[:count]


def prompts_of(fake, pid) -> list:
    """The user and assistant lines one CLI got, as (type, shouldQuery, texts)."""
    return [(line["type"], line.get("shouldQuery"),
             [block.get("text") for block in line["message"]["content"] if isinstance(block, dict)])
            for entry in fake.log() if entry["pid"] == pid and "stdin" in entry
            for line in [entry["stdin"]] if line["type"] in ("user", "assistant")]


def spare_with(fake, max_tokens) -> int:
    """The fake CLI started with this max_tokens that has had no request yet, once there is one."""
    def find():
        return [entry["pid"] for entry in fake.log() if "argv" in entry and entry["max_tokens"] == max_tokens
                and not prompts_of(fake, entry["pid"]) and pid_alive(entry["pid"])]
    assert wait_until(find)
    return find()[0]


@pytest.fixture
def pooled(start_proxy, caplog):
    caplog.set_level("INFO", logger="claude-max-proxy")
    return start_proxy


def test_a_new_conversation_is_served_by_a_spare_started_for_its_launch_settings(pooled, fake, caplog):
    client = pooled()
    assert client.chat(messages=[Q1], max_tokens=50).status == 200
    spare = spare_with(fake, "50")
    assert client.chat(messages=[Q2], max_tokens=50).status == 200
    assert prompts_of(fake, spare) == [("user", None, ["Q2"])]  # the spare, started before Q2 came
    replaced = spare_with(fake, "50")
    assert client.chat(messages=[Q2], max_tokens=60).status == 200  # other settings: no spare fits
    assert served(caplog, 3) == ["cold", "warm", "cold"]
    # The spare follows the newest settings.
    assert wait_until(lambda: not pid_alive(replaced))
    newer = spare_with(fake, "60")
    assert client.chat(messages=[Q2], max_tokens=60).status == 200
    assert prompts_of(fake, newer) == [("user", None, ["Q2"])] and served(caplog, 4)[-1] == "warm"


def sessions_of(fake, pid) -> list:
    """The system prompts one fake CLI was initialized with."""
    return [entry["stdin"]["request"]["systemPrompt"] for entry in fake.log() if entry["pid"] == pid
            and "stdin" in entry and entry["stdin"]["type"] == "control_request"
            and entry["stdin"]["request"]["subtype"] == "initialize"]


def test_a_spare_gets_its_session_ahead_once_a_client_sent_the_same_one_twice(pooled, fake, caplog):
    client = pooled()
    brief = {"role": "system", "content": "Be brief."}
    assert client.chat(messages=[brief, Q1]).status == 200
    plain = spare_with(fake, None)
    assert wait_until(lambda: processes(client)["spare"] == 1) and sessions_of(fake, plain) == []
    assert client.chat(messages=[brief, Q2]).status == 200
    assert sessions_of(fake, plain) == ["Be brief."]  # given when the request came
    ready = spare_with(fake, None)
    assert wait_until(lambda: sessions_of(fake, ready) == ["Be brief."])  # given before any request
    assert client.chat(messages=[brief, {"role": "user", "content": "Q3"}]).status == 200
    assert prompts_of(fake, ready) == [("user", None, ["Q3"])] and sessions_of(fake, ready) == ["Be brief."]
    # A spare with another session ahead cannot take this one: a CLI takes one session only.
    spare = spare_with(fake, None)
    assert wait_until(lambda: sessions_of(fake, spare) == ["Be brief."])
    assert client.chat(messages=[{"role": "system", "content": "Be verbose."}, Q1]).status == 200
    assert prompts_of(fake, spare) == [] and served(caplog, 4) == ["cold", "warm", "warm", "cold"]


def test_idle_spares_retire_after_the_spare_timeout(pooled, fake):
    client = pooled(spare_timeout=0.5)
    assert client.chat().status == 200
    spare = started(fake, 2)[1]
    assert processes(client)["spare"] == 1
    assert wait_until(lambda: processes(client)["spare"] == 0 and not pid_alive(spare))


def test_a_dead_spare_is_never_handed_out_and_is_replaced(pooled, fake):
    client = pooled(conversations=0)
    assert client.chat().status == 200
    dead = started(fake, 2)[1]
    os.kill(dead, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(dead))
    assert client.chat(messages=[Q2]).status == 200
    assert prompts_of(fake, dead) == []
    assert spare_with(fake, None) != dead and wait_until(lambda: processes(client)["spare"] == 1)


def test_a_spare_started_from_a_cli_since_replaced_is_never_handed_out(pooled, fake, tmp_path, caplog):
    claude = tmp_path / "claude"
    shutil.copy(fake.path, claude)
    client = pooled(claude=str(claude), conversations=0)
    assert client.chat().status == 200
    stale = started(fake, 2)[1]
    claude.write_text(claude.read_text() + "\n# a new release\n")  # an upgrade of the CLI
    assert client.chat(messages=[Q2]).status == 200
    assert prompts_of(fake, stale) == [] and served(caplog, 2) == ["cold", "cold"]
    assert wait_until(lambda: not pid_alive(stale))


def test_a_conversation_goes_on_in_the_cli_that_answered_it(pooled, fake, caplog):
    client = pooled()
    assert client.chat(messages=[Q1]).status == 200
    assert processes(client)["live"] == 1
    assert client.chat(messages=[Q1, A1, Q2]).status == 200
    [first] = [pid for pid in pids(fake) if prompts_of(fake, pid)]
    assert prompts_of(fake, first) == [("user", None, ["Q1"]), ("user", None, ["Q2"])]  # no replay
    assert served(caplog, 2) == ["cold", "continued"]
    # What a client adds besides its next message is seeded, as into a new CLI.
    fake.play("echo")
    assert client.chat(messages=[Q1, A1, Q2, A1, {"role": "user", "content": "Q3"},
                                 {"role": "assistant", "content": "A3"}, {"role": "user", "content": "Q4"}]).status == 200
    assert prompts_of(fake, first)[2:] == [("user", False, ["Q3"]), ("assistant", None, ["A3"]),
                                           ("user", None, ["Q4"])]


@pytest.mark.parametrize("history", [
    [Q1, {"role": "assistant", "content": "Hello there"}, Q2],                       # an edited answer
    [{"role": "user", "content": "Q0"}, Q1, A1, Q2],                                  # an edited question
    [{"role": "system", "content": "Be brief."}, Q1, A1, Q2],                         # another system prompt
    [Q1],                                                                             # asked again
])
def test_a_conversation_told_differently_starts_afresh(pooled, fake, caplog, history):
    client = pooled(spares=0)
    assert client.chat(messages=[Q1]).status == 200
    assert client.chat(messages=history).status == 200
    assert served(caplog, 2) == ["cold", "cold"]
    assert len([pid for pid in pids(fake) if prompts_of(fake, pid)]) == 2


def test_a_conversation_goes_on_only_with_the_same_api_key(pooled, fake, caplog):
    client = pooled(spares=0)
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    assert client.chat(messages=[Q1], headers=alice).status == 200
    assert client.chat(messages=[Q1, A1, Q2], headers=bob).status == 200
    assert client.chat(messages=[Q1, A1, Q2]).status == 200  # no key is a key of its own
    assert client.chat(messages=[Q1, A1, Q2], headers=alice).status == 200
    assert served(caplog, 4) == ["cold", "cold", "cold", "continued"]


@pytest.mark.parametrize("scenario, fields", [("stop", {"stop": ["STOP"]}), ("max_tokens", {"max_tokens": 3})])
def test_a_turn_the_cli_saw_differently_is_not_kept(pooled, fake, scenario, fields):
    fake.play(scenario)
    client = pooled(spares=0)
    assert client.chat(messages=[Q1], **fields).status == 200
    first = pids(fake)[0]
    assert wait_until(lambda: not pid_alive(first))
    assert processes(client)["live"] == 0


def test_a_client_that_leaves_does_not_leave_its_conversation_behind(pooled, fake):
    fake.play("stop")  # it streams "one two STOP", then waits
    client = pooled(spares=0)
    conn, reply = client.post_streaming("/v1/chat/completions", {"messages": [Q1]})
    assert any(b'"one ' in reply.readline() for _ in range(4))  # the role chunk, then "one "
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_until(lambda: not pid_alive(pids(fake)[0]))
    # (The request's thread stops the CLI, then gives its place back.)
    assert wait_until(lambda: processes(client) == {"running": 0, "live": 0, "held": 0, "spare": 0, "limit": 8})


TOOL_CALLS = [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ZURICH}},
              {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]


def tool_follow_up(calls=TOOL_CALLS, results=("sunny", "noon")) -> list:
    return [*TOOL_REQUEST["messages"], {"role": "assistant", "content": "Let me check.", "tool_calls": calls},
            *({"role": "tool", "tool_call_id": call["id"], "content": result} for call, result in zip(calls, results))]


def ran(fake) -> list:
    """The calls the fake CLI ran through the tool server, and the results it got."""
    return [(entry["ran"], entry["content"]) for entry in fake.log() if "ran" in entry]


def test_a_tool_step_goes_on_in_the_cli_that_holds_the_calls(pooled, fake, caplog):
    fake.play("tool_calls")
    client = pooled()
    first = client.chat(**TOOL_REQUEST).json()
    assert first["choices"][0]["message"]["tool_calls"] == TOOL_CALLS
    assert processes(client)["held"] == 1
    assert replies_to(fake, "perm-") == []  # the runs wait: neither refused nor allowed yet
    final = client.chat(tools=TOOL_REQUEST["tools"], messages=tool_follow_up()).json()
    assert final["choices"][0]["message"]["content"] == "Sunny at noon."
    assert ran(fake) == [("toolu_1", texts("sunny")), ("toolu_2", texts("noon"))]  # each parallel call, in turn
    assert (final["usage"]["prompt_tokens"], final["usage"]["completion_tokens"]) == (20, 5)  # this step's own
    assert served(caplog, 2) == ["cold", "continued"]
    assert processes(client) == {"running": 0, "live": 1, "held": 0, "spare": 1, "limit": 8}


def test_a_tool_step_goes_on_whatever_the_client_renamed_its_call_ids(pooled, fake, caplog):
    fake.play("tool_calls")
    client = pooled()
    assert client.chat(**TOOL_REQUEST).status == 200
    renamed = [dict(call, id=call["id"].replace("_", "")) for call in TOOL_CALLS]  # as OpenClaw does
    final = client.chat(tools=TOOL_REQUEST["tools"], messages=tool_follow_up(renamed)).json()
    assert final["choices"][0]["message"]["content"] == "Sunny at noon."
    assert served(caplog, 2) == ["cold", "continued"]


@pytest.mark.parametrize("messages", [
    tool_follow_up(results=("sunny", "")),                                          # an empty result
    tool_follow_up(results=("sunny", "x" * (cmp.MAX_RESULT_CHARS + 1))),           # a result too long to pass whole
    [*tool_follow_up(), {"role": "user", "content": "And tomorrow?"}],              # text after the results
    tool_follow_up(calls=[dict(TOOL_CALLS[0], function={"name": "get_weather", "arguments": '{"city": "Rome"}'}),
                          TOOL_CALLS[1]]),                                          # another call than Claude's
])
def test_a_tool_step_the_held_cli_cannot_take_is_replayed_and_the_cli_ended(pooled, fake, caplog, messages):
    fake.play("tool_calls")
    client = pooled(spares=0)
    assert client.chat(**TOOL_REQUEST).status == 200
    held = pids(fake)[0]
    fake.play("text")
    assert client.chat(tools=TOOL_REQUEST["tools"], messages=messages).json()["choices"][0]["message"]["content"] \
        == "Hello world"
    assert served(caplog, 2) == ["cold", "cold"] and ran(fake) == []
    assert wait_until(lambda: not pid_alive(held))


def test_a_held_call_whose_results_never_come_is_released(pooled, fake):
    fake.play("tool_calls")
    client = pooled(conversation_timeout=0.5)
    assert client.chat(**TOOL_REQUEST).status == 200
    held = pids(fake)[0]
    assert processes(client)["held"] == 1
    assert wait_until(lambda: processes(client)["held"] == 0 and not pid_alive(held))


def test_an_agent_loop_runs_in_one_cli(pooled, fake, caplog):
    fake.play("tool_loop 3")
    client = pooled(spares=0)
    messages = [{"role": "user", "content": "Weather in Oslo, thrice?"}]
    tools = [WEATHER]
    for step in range(4):
        message = client.chat(tools=tools, messages=messages).json()["choices"][0]["message"]
        messages.append({key: value for key, value in message.items() if value is not None and key != "refusal"})
        for call in message.get("tool_calls") or []:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": f"sunny {step}"})
    assert messages[-1]["content"] == "Done."
    assert ran(fake) == [(f"toolu_s{step}", texts(f"sunny {step}")) for step in range(3)]
    assert served(caplog, 4) == ["cold", "continued", "continued", "continued"] and len(pids(fake)) == 1


def test_conversations_beyond_the_limit_end_least_recently_used_first(pooled, fake, caplog):
    client = pooled(spares=0, conversations=2)
    for question in ("A", "B", "C"):
        assert client.chat(messages=[{"role": "user", "content": question}]).status == 200
    first, second, third = pids(fake)
    assert wait_until(lambda: not pid_alive(first))
    assert pid_alive(second) and pid_alive(third) and processes(client)["live"] == 2
    assert client.chat(messages=[{"role": "user", "content": "B"}, A1, Q2]).status == 200
    assert served(caplog, 4)[-1] == "continued"


def test_every_cli_process_counts_against_one_budget(pooled, fake):
    client = pooled(max_concurrency=1, max_processes=2, conversations=4)
    most = 0
    for question in "ABCDE":
        assert client.chat(messages=[{"role": "user", "content": question}]).status == 200
        assert wait_until(lambda: processes(client)["spare"] + processes(client)["live"] == 2)
        most = max(most, sum(pid_alive(pid) for pid in pids(fake)))
    assert most == 2
    assert processes(client)["limit"] == 2


def test_a_responses_conversation_goes_on_by_previous_response_id_or_by_its_whole_input(pooled, fake, caplog):
    client = pooled(spares=0)
    first = client.respond(input="Q1").json()
    by_id = client.respond(previous_response_id=first["id"], input="Q2").json()
    assert by_id["output_text"] == "Hello world"
    whole = [{"role": "user", "content": "Q1"}, {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hello world"}]}, {"role": "user", "content": "Q2"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello world"}]},
             {"role": "user", "content": "Q3"}]
    assert client.respond(input=whole, store=False).json()["output_text"] == "Hello world"  # as Codex sends it
    assert served(caplog, 3) == ["cold", "continued", "continued"] and len(pids(fake)) == 1


def test_shutdown_stops_every_spare_and_kept_cli(start_proxy, fake, servers):
    client = start_proxy()
    assert client.chat().status == 200
    assert wait_until(lambda: processes(client)["spare"] == 1 and processes(client)["live"] == 1)
    alive = pids(fake)
    client.server.drain_and_close()
    assert not any(pid_alive(pid) for pid in alive)


# ── 8a. Fuzzing the HTTP layer ───────────────────────────────────────────
# Mutations of valid requests go as raw bytes, each case on a connection of its own; every answer must
# be a well-formed HTTP/1.x response carrying an OpenAI error or a valid result. Each case has a Random
# of its own, made from the seed and its number: FUZZ_SEED=S replays a run, FUZZ_SEED=S FUZZ_CASE=N one
# case of it. `make fuzz` runs many more cases than the suite.

FUZZ_ANSWER_SECONDS = 10  # for each read of an answer: a case still silent after this has hung the server
FUZZ_READ_SECONDS = 1     # the server's read timeout here: a body shorter than its Content-Length waits this long
FUZZ_BODY_LIMIT = 256 * 1024  # MAX_BODY_BYTES here, so that bodies over it are cheap to send
FUZZ_KEY = "sk-fuzz"      # the API key of the server test_http_fuzz_many fuzzes
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [\t\x20-\x7e\x80-\xff]*\r\n")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
ERROR_FIELDS = {"message", "type", "param", "code"}


class Raw:
    """JSON text that goes into a body as it is: what json.dumps would not write (1e400, deep nesting)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def fuzz_json(value) -> str:
    """JSON text of a body tree that may hold Raw values."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {fuzz_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(fuzz_json, value)) + "]"
    return json.dumps(value)


def fuzz_seeds() -> list:
    """Valid requests of each kind, as (method, target, body or None)."""
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'}
    functions = [dict(WEATHER["function"], type="function"), {"type": "namespace", "name": "agents", "tools": [
        {"type": "function", "name": "spawn_agent", "description": "Spawn.", "parameters": {"type": "object"}}]},
        {"type": "web_search"}]
    response = {"model": "claude-sonnet-4", "instructions": "Be brief.", "metadata": {"k": "v"}, "store": True,
                "max_output_tokens": 100, "reasoning": {"effort": "low"}, "tools": functions, "tool_choice": "auto",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Rome?"}]}, call,
                          {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                          {"role": "user", "content": "thanks"}]}
    structured = {"model": "sonnet", "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "person", "strict": True,
        "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}}
    return [
        ("POST", "/v1/chat/completions", {"model": "claude-sonnet-4", "temperature": 0.5, "max_tokens": 100,
                                          "stop": ["STOP"], "user": "u", "messages": [
                                              {"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        ("POST", "/v1/chat/completions", {"model": "sonnet", "stream": True, "stream_options": {"include_usage": True},
                                          "messages": [USER]}),
        ("POST", "/v1/chat/completions", {"model": "claude-sonnet-4", "tools": [WEATHER, CLOCK], "tool_choice": "auto",
                                          "parallel_tool_calls": True, "stream": True,
                                          "messages": [USER, CALL, RESULT, {"role": "user", "content": "and?"}]}),
        ("POST", "/v1/chat/completions", {"model": "haiku", "messages": [USER], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
        ("POST", "/v1/responses", response),
        ("POST", "/v1/responses", dict(response, stream=True)),
        ("POST", "/v1/responses", structured),
        ("GET", "/health", None), ("GET", "/v1/models", None), ("GET", "/v1/models/claude-opus-4", None),
        ("GET", "/v1/responses/resp_0", None), ("DELETE", "/v1/responses/resp_0", None),
        ("OPTIONS", "/v1/chat/completions", None),
    ]


def odd_value(rng: random.Random):
    """A value of some other type or size than a valid request has."""
    return rng.choice([
        None, True, False, 0, -1, 1.5, -0.0, 2 ** 63, -2 ** 64, Raw("1e400"), Raw("-1e400"), Raw("1e-400"),
        Raw("NaN"), Raw("Infinity"), Raw("9" * rng.choice([20, 400, 4300, 5000])), Raw("0." + "1" * 5000),
        "", " ", "x" * rng.choice([1000, 100_000, 300_000]), "\x00", "a\x00b", "\x01\x1f\x7f\n\r\t", "\ud800", "\udfff",
        "\ud83d\ude00", "\ufeff", "é✓💥", "-p", "--help", "/login", "../../etc/passwd", "$(id)", "%s%n",
        Raw('"\ud800"'), Raw('"\\ud800\\u0000\\udfff"'), Raw('"\x00\x1f"'),
        [], [None], [1, "a", {}], {}, {"type": None}, {"": 1}, [[[]]], {"a": {"b": {"c": []}}},
    ])


def deep(rng: random.Random) -> Raw:
    """A value nested hundreds to thousands of levels deep, as JSON text."""
    depth = rng.choice([100, 450, 500, 700, 900, 990, 1100, 3000, 5000, 100_000])
    if rng.random() < 0.5:
        return Raw("[" * depth + rng.choice(["1", '"x"', "{}", "null"]) + "]" * depth)
    return Raw('{"a": ' * depth + rng.choice(["1", '"x"', "[]", "null"]) + "}" * depth)


def json_paths(value, path=()) -> list:
    """Every path into the tree, the root's () included."""
    paths = [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        paths += json_paths(child, path + (key,))
    return paths


def value_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def with_value_at(tree, path, new):
    if not path:
        return new
    value_at(tree, path[:-1])[path[-1]] = new
    return tree


def named(path) -> str:
    return "".join(f"[{key!r}]" for key in path) or "body"


def mutate_json(tree, rng: random.Random, notes: list):
    """The tree with a value swapped for one of another type or size, nested deep, dropped or added."""
    path = rng.choice(json_paths(tree))
    kind = rng.random()
    if kind < 0.7:
        new = odd_value(rng) if kind < 0.55 else deep(rng)
        notes.append(f"{named(path)}={new!r:.60}")
        return with_value_at(tree, path, new)
    if kind < 0.85 and path:
        notes.append(f"del {named(path)}")
        del value_at(tree, path[:-1])[path[-1]]
        return tree
    containers = [path for path in json_paths(tree) if isinstance(value_at(tree, path), (dict, list))] or [()]
    path = rng.choice(containers)
    tree = tree if isinstance(tree, (dict, list)) else {}
    container, new = value_at(tree, path), odd_value(rng)
    if isinstance(container, dict):
        key = rng.choice(["model", "stream", "messages", "input", "tools", "type", "role", "content", "n",
                          "previous_response_id", "store", "x-unknown", ""])
        container[key] = new
        notes.append(f"{named(path)}[{key!r}]={new!r:.60}")
    else:
        container.insert(rng.randrange(len(container) + 1), new)
        notes.append(f"insert into {named(path)}: {new!r:.60}")
    return tree


BAD_BYTES = [b"\xff", b"\xfe\xff", b"\x80", b"\xc0\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
             b"\x00", b"\x00" * 10, b"\r\n", b"\x1b[2J"]


def mutate_bytes(body: bytes, rng: random.Random, notes: list) -> bytes:
    """The body with bytes that are not JSON or not UTF-8 put in, or cut short."""
    kind = rng.randrange(7)
    at = rng.randrange(len(body) + 1)
    if kind == 0:
        bad = rng.choice(BAD_BYTES)
        notes.append(f"bytes {bad!r} at {at}")
        return body[:at] + bad + body[at:]
    if kind == 1:
        notes.append(f"cut at {at}")
        return body[:at]
    if kind == 2:
        notes.append(f"byte {at} changed")
        return body[:at] + bytes([rng.randrange(256)]) + body[at + 1:]
    if kind == 3:
        notes.append("BOM first")
        return b"\xef\xbb\xbf" + body
    if kind == 4:
        encoding = rng.choice(["utf-16", "utf-16-be", "utf-32-le"])
        notes.append(f"encoded {encoding}")
        return body.decode("utf-8", "surrogatepass").encode(encoding, "surrogatepass")
    if kind == 5:
        new = rng.choice([b"", b" ", b"null", b"[]", b"{}", b'"x"', b"1e400", b"[" * 200_000, b'{"a":' * 50_000,
                          b"{" * 3, b"\x00" * 100])
        notes.append(f"body {new[:20]!r}")
        return new
    notes.append("a key repeated")
    return body[:-1] + b', "model": 7, "messages": 7, "input": 7}' if body.endswith(b"}") else body + b"}"


class FuzzRequest:
    """A request as the parts its bytes are made of, for the mutations to change."""

    def __init__(self, method: str, target: str, body: bytes | None, key: str | None = None):
        self.method, self.target, self.version = method.encode(), target.encode(), b"HTTP/1.1"
        self.line: bytes | None = None  # a whole request line of a mutation's own
        self.headers = [(b"Host", b"127.0.0.1"), *([(b"Content-Type", b"application/json")] if body else []),
                        *([(b"Authorization", b"Bearer " + key.encode())] if key else [])]
        self.body = body or b""
        self.content_length: bytes | None = b"%d" % len(self.body) if body is not None else None
        self.chunks: bytes | None = None  # the body as sent, chunked
        self.eol = b"\r\n"
        self.before = b""  # bytes sent ahead of the request line

    @property
    def head(self) -> bool:
        return self.line is None and self.method == b"HEAD"

    def raw(self) -> bytes:
        line = self.line if self.line is not None else b" ".join(filter(None, (self.method, self.target,
                                                                               self.version)))
        length = [(b"Content-Length", self.content_length)] if self.content_length is not None else []
        head = [line, *(name + b": " + value if name is not None else value
                        for name, value in self.headers + length)]
        return self.before + b"".join(part + self.eol for part in head) + self.eol + (
            self.chunks if self.chunks is not None else self.body)


def chunked(body: bytes, rng: random.Random) -> bytes:
    pieces, at = [], 0
    while at < len(body):
        size = rng.randint(1, max(1, len(body) // 3))
        pieces.append(b"%x\r\n%s\r\n" % (len(body[at:at + size]), body[at:at + size]))
        at += size
    return b"".join(pieces) + b"0\r\n\r\n"


def mutate_headers(request: FuzzRequest, rng: random.Random, notes: list):
    length = len(request.body)
    kind = rng.randrange(20)
    if kind == 0:
        request.content_length = None
        notes.append("no Content-Length")
    elif kind == 1:
        request.content_length = rng.choice([b"-1", b"abc", b"1.5", b"0x10", b" 12 ", b"+12", b"", b"\xb2",
                                             "١٢".encode(), b"9" * 5000, b"99999999999999999999", b"1e3",
                                             b"%d, %d" % (length, length), b"0"])
        notes.append(f"Content-Length: {request.content_length[:30]!r}")
    elif kind == 2:
        extra = rng.choice([1, 10, 1000])
        request.content_length = b"%d" % (length + extra)  # the server waits for bytes that never come
        notes.append(f"Content-Length {extra} more than the body")
    elif kind == 3 and length:
        request.content_length = b"%d" % rng.randrange(length)
        notes.append(f"Content-Length {request.content_length.decode()} of {length}")
    elif kind == 4:
        request.headers.append((b"Content-Length", rng.choice([b"%d" % length, b"%d" % (length + 5), b"0"])))
        notes.append(f"second Content-Length {request.headers[-1][1]!r}")
    elif kind in (5, 6):
        if rng.random() < 0.7:
            request.content_length = None
        request.headers.append((b"Transfer-Encoding", rng.choice([b"chunked", b"chunked", b"gzip, chunked",
                                                                  b"identity", b"chunked, chunked", b"CHUNKED"])))
        request.chunks = chunked(request.body, rng) if rng.random() < 0.6 else rng.choice([
            b"zz\r\n{}\r\n0\r\n\r\n", b"5\r\n{}\r\n", b"ffffffffffffffffffff\r\n{}", b"2;x=y\r\n{}\r\n0\r\n\r\n",
            b"-1\r\n\r\n", b"0\r\n", b"%x\r\n%s" % (length + 10, request.body)])
        notes.append(f"Transfer-Encoding {request.headers[-1][1]!r}, CL {request.content_length!r:.20}, "
                     f"chunks {request.chunks[:30]!r}")
    elif kind == 7:
        request.headers.append(rng.choice([(b"Host", b"evil.example"), (b"Host", b"127.0.0.1"),
                                           (b"Content-Type", b"text/plain")]))
        notes.append(f"second {request.headers[-1]!r}")
    elif kind == 8:
        size = rng.choice([8000, 65_000, 70_000])
        request.headers.append((b"X-Long", b"v" * size))
        notes.append(f"{size}-byte header")
    elif kind == 9:
        count = rng.choice([99, 100, 200])
        request.headers += [(b"X-%d" % i, b"y") for i in range(count)]
        notes.append(f"{count} more headers")
    elif kind == 10:
        host = rng.choice([None, b"", b"evil.example", b"127.0.0.1:99999", b"[::1", b"[::1]:80", b"localhost:abc",
                           b"\xff\xfe", b"a" * 10_000, b"localhost, evil.example", b"LOCALHOST", b"127.0.0.1.",
                           b"[::ffff:127.0.0.1]", b"0x7f.1", b"localhost:", b":80", b"\x00"])
        request.headers = [(n, v) for n, v in request.headers if n != b"Host"] + ([(b"Host", host)] if host is not
                                                                                   None else [])
        notes.append(f"Host: {host!r:.30}")
    elif kind == 11:
        header = rng.choice([(b"X-\xff\xfe", b"1"), (b"X-Bytes", b"\xc3\xa9\xff\x00"), (b"Origin", b"http://\xc3\xa9"),
                             (b"Authorization", b"Bearer \xff"), (b"X-Request-Id", b"\xff" * 200),
                             (b"Content-Type", b"application/json; charset=\xff")])
        request.headers.append(header)
        notes.append(f"header {header!r}")
    elif kind == 12:
        line = rng.choice([b"NoColonHere", b"Content-Length : 5", b" folded continuation", b"\tfolded", b": empty name",
                           b"X-Nul\x00: 1", b"X-Space Name: 1", b"\x00", b"X:" + b"\x00" * 10])
        request.headers.insert(rng.randrange(len(request.headers) + 1), (None, line))
        notes.append(f"header line {line!r}")
    elif kind == 13:
        request.eol = rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"])
        notes.append(f"lines end with {request.eol!r}")
    elif kind == 14:
        header = rng.choice([(b"Origin", b"http://evil.example"), (b"Origin", b"http://allowed.example"),
                             (b"Origin", b"null"), (b"Origin", b""),
                             (b"Access-Control-Request-Headers", b"x-a, \xff, " + b"b," * 1000)])
        request.headers.append(header)
        notes.append(f"header {header!r:.60}")
    elif kind == 15:
        value = rng.choice([b"", b"Bearer", b"Bearer ", b"bearer " + FUZZ_KEY.encode(), b"Basic eDp5",
                            b"Bearer " + b"k" * 10_000, b"Bearer sk-fuzz\x00", b"Bearer \xe2\x9c\x93"])
        request.headers = [(n, v) for n, v in request.headers if n != b"Authorization"] + [(b"Authorization", value)]
        notes.append(f"Authorization: {value!r:.40}")
    elif kind == 16:
        header = rng.choice([(b"X-Request-Id", b"req-1"), (b"X-Request-Id", b"a" * 200),
                             (b"X-Request-Id", b"\r"), (b"Expect", b"100-continue"), (b"Expect", b"bogus"),
                             (b"Connection", b"close"), (b"Connection", b"keep-alive"), (b"Connection", b"upgrade"),
                             (b"Upgrade", b"h2c"), (b"Content-Encoding", b"gzip")])
        request.headers.append(header)
        notes.append(f"header {header!r:.60}")
    elif kind == 17:
        request.headers = []
        notes.append("no headers")
    elif kind == 18:
        request.headers = [(name.lower() if name else name, value) for name, value in request.headers]
        request.content_length, request.headers = None, request.headers + (
            [(b"content-length", request.content_length)] if request.content_length is not None else [])
        notes.append("header names in lowercase")
    else:
        request.headers.append((b"Content-Type", rng.choice([b"text/plain", b"", b"application/x-www-form-urlencoded",
                                                             b"multipart/form-data; boundary=x"])))
        notes.append(f"Content-Type {request.headers[-1][1]!r}")


def mutate_request_line(request: FuzzRequest, rng: random.Random, notes: list):
    kind = rng.randrange(5)
    if kind == 0:
        request.method = rng.choice([b"post", b"get", b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"PUT", b"PATCH",
                                     b"BREW", b"CONNECT", b"TRACE", b"P\x00ST", b"G\xffT", b"X" * 1000, b"M-SEARCH",
                                     b"POST\t"])
        notes.append(f"method {request.method[:20]!r}")
    elif kind == 1:
        request.target = rng.choice([
            b"*", b"http://[/v1/models", b"/v1/chat/completions?x=%zz", b"/v1/models?%", b"http://[::1/",
            b"http://127.0.0.1/v1/chat/completions", b"https://user:pw@localhost:1/v1/responses", b"//v1/models",
            b"/v1/models/" + b"a" * rng.choice([1000, 70_000]), b"/" + b"a" * 8000, b"/v1/models/%00",
            b"/v1/models/%ff%fe", b"/v1/models/%zz", b"/v1/models/..%2f..%2fetc", b"/v1/responses/%00",
            b"/v1/responses/" + b"r" * 5000, b"/v1/responses/%ud800", b"/v1/chat/completions#frag",
            b"/v1/chat/completions\x00", b"/v1/\x01\x7f", b"/v1/\xff\xfe", b"?", b"/V1/CHAT/COMPLETIONS",
            b"/v1/chat/completions/../models", b"/v1/chat/completions?" + b"a=1&" * 2000, b"/%", b"v1/models",
            b"/v1/models/claude-sonnet-4-5-20250929", b"/v1/models/%E2%9C%93", b"/v1/responses/resp_0/x",
            b"/health?x=" + b"%00" * 100, b"http://127.0.0.1:99999/health", b"http:/health", b"\\v1\\models"])
        notes.append(f"target {request.target[:50]!r}")
    elif kind == 2:
        request.version = rng.choice([b"HTTP/2.0", b"HTTP/2", b"http/1.1", b"HTTP/1.1x", b"HTTP/0.9", b"", b"HTTP/1",
                                      b"HTTP/1.10", b"HTTP/1.1.1", b"HTTP/99999999999.1", b"HTTP/1.0", b"HTTP/",
                                      b"HTTP/1.1\x00", b"HTTP/3.0", b"HTTP/01.01", b"HTTP/1.\xb2", b"HTTP/+1.-1",
                                      b"HTTP/1_1", b"FTP/1.1"])
        notes.append(f"version {request.version!r}")
    elif kind == 3:
        parts = [request.method, request.target, request.version]
        sep = rng.choice([b"  ", b"\t", b" \t ", b"\x0b", b"\x0c"])
        request.line = rng.choice([sep.join(parts), b" " + b" ".join(parts), b" ".join(parts) + b" ",
                                   b" ".join(parts + [b"extra"]), request.method, b" ".join(parts[:2]) + b" ",
                                   b"", b" ", b"\x00" + b" ".join(parts), b" ".join(parts) + b"\x00",
                                   b"\xef\xbb\xbf" + b" ".join(parts)])
        notes.append(f"request line {request.line[:60]!r}")
    else:
        request.before = rng.choice([b"\r\n", b"\n", b"\r\n\r\n"])  # RFC 9112 2.2: a server SHOULD ignore these
        notes.append(f"{request.before!r} before the request line")


def fuzz_request(rng: random.Random, stored: list, key: str | None) -> tuple[FuzzRequest, list]:
    """One case: a valid request, mutated at random in its body, headers or request line."""
    seeds = fuzz_seeds()
    with_body = [seed for seed in seeds if seed[2] is not None]
    method, target, body = rng.choice(with_body if rng.random() < 0.8 else seeds)
    notes = [f"{method} {target}"]
    use_stored, pick = rng.random() < 0.2, rng.random()  # drawn either way, so a case replays alone
    if stored and use_stored and "/v1/responses" in target:  # a kept response: read, deleted or gone on with
        kept = stored[int(pick * len(stored))]
        if body is None:
            target = target.replace("resp_0", kept)
        else:
            body = dict(body, previous_response_id=kept)
        notes[0] = f"{method} {target}" + (f" after {kept}" if body else "")
    raw = None
    if body is not None:
        tree = json.loads(json.dumps(body))
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            tree = mutate_json(tree, rng, notes)
        raw = fuzz_json(tree).encode("utf-8", "surrogatepass")
        if rng.random() < 0.15:
            raw = mutate_bytes(raw, rng, notes)
    request = FuzzRequest(method, target, raw, key)
    if rng.random() < 0.3:
        mutate_headers(request, rng, notes)
    if rng.random() < 0.25:
        mutate_request_line(request, rng, notes)
    return request, notes


class FuzzProblem(Exception):
    pass


def read_head(reader) -> tuple[int, dict, bytes]:
    """A response's status line and headers, read strictly; 1xx responses are skipped."""
    while True:
        line = reader.readline(70_000)
        if not line:
            raise FuzzProblem("the connection closed without an answer")
        if not STATUS_LINE.fullmatch(line):
            raise FuzzProblem(f"no status line but {line[:100]!r}")
        status, headers = int(STATUS_LINE.fullmatch(line)[1]), {}
        while (field := reader.readline(70_000)) != b"\r\n":
            found = HEADER_LINE.fullmatch(field)
            if not found:
                raise FuzzProblem(f"status {status}, then a header line {field[:100]!r}")
            name = found[1].decode().lower()
            if name in headers and name in ("content-length", "transfer-encoding", "content-type"):
                raise FuzzProblem(f"status {status} with two {name} headers")
            headers[name] = found[2].decode("latin-1")
        if status >= 200:
            return status, headers, line


def read_body(reader, status: int, headers: dict, head: bool) -> bytes:
    if head or status in (204, 304):
        return b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = reader.readline(100)
            if not re.fullmatch(rb"[0-9a-fA-F]{1,16}\r\n", size_line):
                raise FuzzProblem(f"status {status}, a chunk size line {size_line[:50]!r} after {body[-200:]!r}")
            size = int(size_line, 16)
            chunk = reader.read(size + 2)
            if len(chunk) != size + 2 or not chunk.endswith(b"\r\n"):
                raise FuzzProblem(f"status {status}, a chunk cut short after {body[-200:]!r}")
            body += chunk[:-2]
            if size == 0:
                return body
    if not re.fullmatch(r"[0-9]+", headers.get("content-length", "")):
        raise FuzzProblem(f"status {status} with neither Content-Length nor chunked: {headers}")
    body = reader.read(int(headers["content-length"]))
    if len(body) != int(headers["content-length"]):
        raise FuzzProblem(f"status {status}, its body cut short: {body[:200]!r}")
    return body


def check_error(status: int, headers: dict, body: bytes):
    try:
        error = json.loads(body)["error"]
        assert set(error) == ERROR_FIELDS and isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and headers.get("content-type", "").startswith("application/json")
    except (ValueError, KeyError, TypeError, AssertionError):
        raise FuzzProblem(f"status {status} without an OpenAI error: {body[:300]!r}") from None


def check_sse(body: bytes):
    """A whole chat stream ending with [DONE], or Responses events ending with the response's last event."""
    try:
        frames = [frame for frame in body.decode().split("\n\n") if frame and not frame.startswith(":")]
        assert body.endswith(b"\n\n") and frames
        if frames[0].startswith("data: "):  # chat
            assert frames[-1] == "data: [DONE]"
            for frame in frames[:-1]:
                chunk = json.loads(frame.removeprefix("data: "))
                assert frame.startswith("data: ") and (chunk["object"] == "chat.completion.chunk" if "error" not in
                                                       chunk else set(chunk["error"]) == ERROR_FIELDS)
            return
        events = []
        for frame in frames:
            name, _, data = frame.partition("\ndata: ")
            events.append(json.loads(data))
            assert name.startswith("event: ") and events[-1]["type"] == name.removeprefix("event: ")
        assert [event["sequence_number"] for event in events] == list(range(len(events)))
        assert events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
    except (ValueError, KeyError, TypeError, AssertionError):
        raise FuzzProblem(f"a stream that is not a whole chat or Responses stream: ...{body[-300:]!r}") from None


def check_answer(status: int, headers: dict, body: bytes, head: bool) -> dict | None:
    """The answer's JSON result if it has one; FuzzProblem if it is neither a valid result nor an OpenAI error."""
    if status == 500 or not (200 <= status < 300 or 400 <= status < 600):
        raise FuzzProblem(f"status {status}: {body[:300]!r}")
    if status >= 400:
        return None if head else check_error(status, headers, body)
    if head or status == 204:
        if body:
            raise FuzzProblem(f"status {status} with a body {body[:100]!r}")
        return None
    if headers.get("content-type", "").startswith("text/event-stream"):
        check_sse(body)
        created = re.search(rb'"id": ?"(resp_[0-9a-zA-Z]+)"', body)
        return {"id": created[1].decode()} if created else None
    try:
        result = json.loads(body)
    except ValueError:
        result = None
    if not isinstance(result, dict) or set(result.get("error") or ()) == ERROR_FIELDS or not headers.get(
            "content-type", "").startswith("application/json"):
        raise FuzzProblem(f"status {status} with {headers.get('content-type')!r} {body[:300]!r}")
    return result


def exchange(port: int, data: bytes, head: bool) -> tuple[list, list]:
    """Send one case; read every answer on its connection. After an answer that leaves the connection
    open, a GET /health with Connection: close follows, so that what the server makes of the rest
    of what was sent is read too. The answers' statuses and starts, and their JSON results."""
    answers, results = [], []
    with socket.create_connection(("127.0.0.1", port), timeout=FUZZ_ANSWER_SECONDS) as sock:
        reader = sock.makefile("rb")
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # the server answered before it read it all
            pass
        try:
            while True:
                status, headers, line = read_head(reader)
                body = read_body(reader, status, headers, head)
                result = check_answer(status, headers, body, head)
                answers.append((status, line + body[:100]))
                results += [result] if result else []
                if headers.get("connection", "").lower() == "close":
                    rest = reader.read()
                    if rest:
                        raise FuzzProblem(f"status {status} said Connection: close, then came {rest[:200]!r}")
                    return answers, results
                if len(answers) > 20:
                    raise FuzzProblem("more than 20 answers")
                head = False
                try:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    raise FuzzProblem(f"status {status} left the connection open, then it broke") from None
        except socket.timeout:  # TimeoutError from Python 3.10 on
            raise FuzzProblem(f"no answer within {FUZZ_ANSWER_SECONDS} s after the answers {answers}") from None
        except ConnectionResetError:
            raise FuzzProblem(f"the connection was reset after the answers {answers}") from None
        except FuzzProblem as problem:
            raise FuzzProblem(f"{problem} (after the answers {answers})" if answers else str(problem)) from None


def fuzz(client: Client, seed: int, count: int, only: int | None = None, key: str | None = None,
         connections: int = 1) -> list:
    """Run the cases numbered 0 to count - 1 (or just `only`); what went wrong in each that failed."""
    failures, stored, crashes, lock = [], [], [], threading.Lock()
    numbers = iter([only] if only is not None else range(count))

    def run_case(number: int):
        rng = random.Random(f"{seed}:{number}")
        request, notes = fuzz_request(rng, list(stored), key)
        data = request.raw()
        try:
            _, results = exchange(client.port, data, request.head)
            stored.extend(r["id"] for r in results if str(r.get("id")).startswith("resp_"))
        except FuzzProblem as problem:
            with lock:
                failures.append(f"FUZZ_SEED={seed} FUZZ_CASE={number}: {'; '.join(notes)}\n"
                                f"    sent {data[:300]!r}{'...' if len(data) > 300 else ''}\n    {problem}")

    def run():
        try:
            while True:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    return
                run_case(number)
        except BaseException as crash:  # a bug of the test's own: raised below, not lost in a thread
            crashes.append(crash)

    threads = [threading.Thread(target=run) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if crashes:
        raise crashes[0]
    return failures


def fuzz_settings(default_cases: int) -> tuple[int, int, int | None]:
    seed = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2 ** 32))
    count = int(os.environ.get("FUZZ_CASES") or default_cases)
    only = int(os.environ["FUZZ_CASE"]) if os.environ.get("FUZZ_CASE") else None
    print(f"fuzz seed={seed} cases={count}" + (f" only case {only}" if only is not None else ""))
    return seed, count, only


def check_fuzz(client: Client, seed: int, failures: list):
    assert not failures, f"{len(failures)} fuzz case(s) failed (seed {seed}):\n" + "\n".join(failures[:15])
    health = client.call("GET", "/health", headers={"Authorization": f"Bearer {FUZZ_KEY}"})
    assert health.status == 200, f"the server is down after the fuzz (seed {seed}): {health.status} {health.text}"


@pytest.fixture
def fuzzed_proxy(start_proxy, monkeypatch):
    """A proxy with a short read timeout and body limit, so that cases which wait for bytes or send
    many of them are quick."""
    monkeypatch.setattr(cmp, "MAX_BODY_BYTES", FUZZ_BODY_LIMIT)
    return lambda **options: start_proxy(read_timeout=FUZZ_READ_SECONDS, **options)


def test_http_fuzz(fuzzed_proxy):
    """Mutated requests get a well-formed answer: an OpenAI error or a valid result, never a 500."""
    seed, count, only = fuzz_settings(default_cases=300)
    client = fuzzed_proxy()
    check_fuzz(client, seed, fuzz(client, seed, count, only))


@pytest.mark.skipif(not os.environ.get("FUZZ_MANY"), reason="`make fuzz` runs it")
def test_http_fuzz_many(fuzzed_proxy):
    """As test_http_fuzz, at length, four connections at a time, against a proxy with an API key and CORS."""
    seed, count, only = fuzz_settings(default_cases=5000)
    client = fuzzed_proxy(api_key=FUZZ_KEY, cors_origins=("http://allowed.example",))
    check_fuzz(client, seed, fuzz(client, seed, count, only, key=FUZZ_KEY, connections=4))


# ── 8b. Integration: the real CLI against the fake Anthropic API ────────────

def test_real_completion(real_client, upstream):
    upstream.default = answer("Paris.", usage={"input_tokens": 12, "output_tokens": 3,
                                               "cache_read_input_tokens": 100,
                                               "cache_creation_input_tokens": 20})
    reply = real_client.chat(model="openai/claude-opus-4",
                             messages=[{"role": "user", "content": "Capital of France?"}])
    body = reply.json()
    assert reply.status == 200 and body["model"] == "openai/claude-opus-4"
    assert body["choices"][0]["message"]["content"] == "Paris."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 132 and body["usage"]["completion_tokens"] == 3
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}
    assert upstream.last["model"] == "claude-opus-5-5"
    assert user_texts(upstream.last) == [["Capital of France?"]]


def test_real_stream(real_client, upstream):
    upstream.default = answer(pieces=["Hel", "lo"], thinking="Hmm.")
    reply, frames = real_client.stream(stream_options={"include_usage": True})
    chunks = [f for f in frames if isinstance(f, dict)]
    assert reply.status == 200 and frames[-1] == "[DONE]"
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""},
                                                              {"reasoning_content": "Hmm."}]
    assert content_of(chunks) == "Hello"  # in one delta or two, as the CLI's lines came together or not
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 15


def test_real_text_is_forwarded_as_it_arrives(real_client, upstream):
    upstream.default = answer(pieces=["first ", "second"], hold_after=1)
    _, frames = real_client.open_stream()
    first_content = next(f for f in frames if isinstance(f, dict) and f["choices"][0]["delta"].get("content"))
    assert first_content["choices"][0]["delta"]["content"] == "first "
    assert not upstream.finished.is_set()  # the upstream is still holding "second"
    upstream.release.set()
    assert content_of(frames) == "second"


def test_real_system_prompt_is_the_clis_system_prompt_not_user_text(real_client, upstream):
    real_client.chat(messages=[{"role": "system", "content": "SYSTEM-MARKER"},
                               {"role": "developer", "content": "DEVELOPER-MARKER"}, USER])
    system_text = json.dumps(upstream.last["system"])
    assert "SYSTEM-MARKER\\n\\nDEVELOPER-MARKER" in system_text
    assert "MARKER" not in json.dumps(upstream.last["messages"])


def test_real_conversation_reaches_upstream_as_real_turns(real_client, upstream):
    reply = real_client.chat(messages=[
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q3"}])
    assert reply.status == 200 and len(upstream.posts) == 1
    turns = [(m["role"], m["content"]) for m in upstream.last["messages"] if m["role"] != "system"]
    assert [role for role, _ in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert user_texts(upstream.last) == [["Q1"], ["Q2"], ["Q3"]]
    assert [c[0]["text"] for r, c in turns if r == "assistant"] == ["A1", "A2"]


def test_real_consecutive_user_messages_reach_upstream_as_one_turn(real_client, upstream):
    real_client.chat(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "prompt"},
                               {"role": "user", "content": [{"type": "text", "text": "internal context"}]}])
    assert user_texts(upstream.last) == [["prompt", "internal context"]]


def test_real_images_reach_upstream(real_client, upstream):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    reply = real_client.chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}])
    assert reply.status == 200
    blocks = upstream.last["messages"][0]["content"]
    sources = [b["source"] for b in blocks if b["type"] == "image"]
    assert sources == [{"type": "base64", "media_type": "image/png", "data": png},
                       {"type": "url", "url": "https://example.com/cat.jpg"}]


@pytest.mark.parametrize("prompt", ["--help", "-x", "/cost", "/foo bar", "/usr/bin/env is broken",
                                    pytest.param("x" * 300_000, id="300KB")])
def test_real_prompts_arrive_intact_whatever_they_look_like(real_client, upstream, prompt):
    reply = real_client.chat(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": "ok"},
                                       {"role": "user", "content": prompt}])
    assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"] == "Hello from fake upstream."
    assert ["".join(texts) for texts in user_texts(upstream.last)] == [prompt, prompt]
    assert "slash command" not in json.dumps(upstream.last["messages"])


def test_real_cli_has_no_tools_no_project_files_and_saves_nothing(real_client, upstream, tmp_path,
                                                                 monkeypatch):
    (tmp_path / "CLAUDE.md").write_text("PROJECT-MEMORY-MARKER")
    monkeypatch.chdir(tmp_path)
    assert real_client.chat().status == 200
    body = json.dumps(upstream.last)
    assert upstream.last["tools"] == []
    assert "PROJECT-MEMORY-MARKER" not in body and str(tmp_path) + "\\n" not in body
    projects = Path(os.environ["HOME"]) / ".claude" / "projects"
    assert not list(projects.rglob("*.jsonl")) if projects.exists() else True


def test_real_max_tokens_effort_and_no_thinking_reach_upstream(real_client, upstream):
    real_client.chat(max_completion_tokens=77, reasoning_effort="high")
    assert upstream.last["max_tokens"] == 77 and upstream.last["output_config"]["effort"] == "high"
    assert "thinking" in upstream.last
    real_client.chat(reasoning_effort="none")
    assert "thinking" not in upstream.last


@pytest.mark.parametrize("stream", [False, True])
def test_real_max_tokens_ends_with_length_and_no_continuation(real_client, upstream, stream):
    upstream.default = answer(pieces=["trun", "cated"], stop_reason="max_tokens")
    text, finish = text_and_finish(real_client, stream, max_tokens=3)
    assert (text, finish) == ("truncated", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_real_stop_sequence_ends_the_text_and_stops_claude(real_client, upstream, stream):
    upstream.default = answer(pieces=["one ", "two ", "STOP", " three"], hold_after=3)
    text, finish = text_and_finish(real_client, stream, stop=["STOP"])
    assert (text, finish) == ("one two ", "stop")
    upstream.release.set()  # the rest of the reply now meets a closed connection: the CLI hung up
    assert upstream.hung_up.wait(10) and not upstream.finished.is_set()


def test_real_subscription_is_used_even_with_an_api_key_in_the_environment(start_real_proxy, upstream,
                                                                          monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-billed")
    start_real_proxy().chat()
    assert "x-api-key" not in upstream.posts[-1]["headers"]
    assert upstream.posts[-1]["headers"]["authorization"] == "Bearer test"
    start_real_proxy(use_api_key=True).chat()
    assert upstream.posts[-1]["headers"]["x-api-key"] == "sk-ant-billed"


def test_real_cli_retries_are_bounded(start_real_proxy, upstream):
    upstream.default = fail(500, "api_error", "Internal server error")
    reply = start_real_proxy(max_retries=1).chat()
    assert (reply.status, reply.error["code"]) == (502, "upstream_error")
    assert len(upstream.posts) == 2


def test_real_rate_limit_is_429_with_the_upstreams_retry_after(start_real_proxy, upstream):
    upstream.default = fail(429, "rate_limit_error", "Number of request tokens has exceeded your limit",
                            [("retry-after", "2")])
    reply = start_real_proxy(max_retries=1).chat()  # the CLI waits out the retry-after once, then gives up
    assert reply.status == 429 and reply.headers["retry-after"] == "2"
    assert reply.error["type"] == "rate_limit_error" and "exceeded your limit" in reply.error["message"]


def unified_headers(status, used, resets_in, *, weekly=0.41, overage=None) -> dict:
    """Anthropic's rate-limit headers for the subscription: the 5-hour window, the 7-day one, overage."""
    reset = int(time.time()) + resets_in
    headers = {"anthropic-ratelimit-unified-status": status, "anthropic-ratelimit-unified-reset": str(reset),
               "anthropic-ratelimit-unified-representative-claim": "five_hour",
               "anthropic-ratelimit-unified-5h-status": status, "anthropic-ratelimit-unified-5h-utilization": str(used),
               "anthropic-ratelimit-unified-5h-reset": str(reset),
               "anthropic-ratelimit-unified-7d-status": "allowed", "anthropic-ratelimit-unified-7d-utilization": str(weekly),
               "anthropic-ratelimit-unified-7d-reset": str(reset + 86400)}
    if overage:
        headers.update({"anthropic-ratelimit-unified-overage-status": "allowed",
                        "anthropic-ratelimit-unified-overage-in-use": "true"})
    return headers


def test_real_usage_windows_show_in_usage_health_and_every_answers_headers(start_real_proxy, upstream):
    upstream.headers = unified_headers("allowed_warning", 0.87, 3600)
    proxy, key = start_real_proxy(api_key="k"), {"Authorization": "Bearer k"}
    before = proxy.call("GET", "/v1/usage", headers=key).json()
    assert before["windows"] is None and before["reason"]
    reply = proxy.chat(headers=key)
    assert reply.status == 200  # a warning is no error
    assert reply.headers["anthropic-ratelimit-unified-status"] == "allowed_warning"
    assert (reply.headers["anthropic-ratelimit-unified-5h-utilization"],
            reply.headers["anthropic-ratelimit-unified-7d-utilization"]) == ("0.87", "0.41")
    assert int(reply.headers["anthropic-ratelimit-unified-5h-reset"]) == int(upstream.headers[
        "anthropic-ratelimit-unified-5h-reset"])
    usage = proxy.call("GET", "/v1/usage", headers=key).json()
    assert usage["status"] == "allowed_warning" and usage["age_seconds"] <= 5
    assert usage["windows"]["five_hour"]["used"] == 0.87 and usage["windows"]["seven_day"]["used"] == 0.41
    assert 3500 <= usage["windows"]["five_hour"]["resets_in_seconds"] <= 3600
    assert usage["extra_usage"]["in_use"] is False and usage["extra_usage"]["allowed"] is False
    assert proxy.call("GET", "/health", headers=key).json()["usage"]["windows"] == usage["windows"]
    assert proxy.call("GET", "/health").json()["usage"] is None  # the window is the key holder's to see
    refused = proxy.chat()
    assert refused.status == 401 and not [name for name in refused.headers if "ratelimit" in name]
    upstream.headers = unified_headers("allowed_warning", 0.9, 3600)
    streamed, frames = proxy.open_stream(headers=key)
    list(frames)
    assert streamed.getheader("anthropic-ratelimit-unified-5h-utilization") == "0.87"  # as last seen
    conn, response = proxy.post_streaming("/v1/responses", {"input": "hi"}, key)
    response.read()
    conn.close()
    assert response.getheader("anthropic-ratelimit-unified-5h-utilization") == "0.9"  # the stream before saw it


def browser_dom(url: str, tmp_path) -> str:
    """The page's DOM once a headless Chromium has run its script: CI installs Chromium (.ci/run sets CI)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        assert not os.environ.get("CI"), "Chromium is missing: CI installs Debian's package chromium"
        pytest.skip("no Chromium here")
    # Virtual time runs the page's timers and waits for its fetches; the profile is the test's own.
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=3000", "--dump-dom",
                           url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_real_status_page_in_a_browser_shows_the_windows_and_the_last_request(start_real_proxy, upstream,
                                                                               tmp_path):
    upstream.headers = unified_headers("allowed_warning", 0.87, 3600)
    proxy = start_real_proxy()
    assert proxy.chat(model="sonnet").status == 200
    assert wait_until(lambda: proxy.call("GET", "/v1/status").json()["recent"])  # listed once its answer is out
    dom = browser_dom(f"http://127.0.0.1:{proxy.port}/", tmp_path)
    five_hour = re.search(r'data-window="five_hour">(.*?)</div></div></div>', dom).group(1)
    assert "87 % used (allowed_warning)" in five_hour and "width: 87%" in five_hour and "in 59 min" in five_hour
    assert "41 % used" in re.search(r'data-window="seven_day">(.*?)</div></div></div>', dom).group(1)
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(<td.*?)</tr>", dom)]
    assert len(rows) == 1 and rows[0][1:5] + rows[0][6:] == ["/v1/chat/completions", "sonnet", "200", "10+5", "cold"]
    assert re.fullmatch(r"\d+\.\d\d s", rows[0][5])
    assert "<b>2.1.329</b>Claude Code" in dom and '<section id="login" class="card" hidden="">' in dom


def test_real_status_page_with_an_api_key_asks_for_it(start_real_proxy, upstream, tmp_path):
    proxy = start_real_proxy(api_key="k")
    dom = browser_dom(f"http://127.0.0.1:{proxy.port}/", tmp_path)
    assert '<section id="login" class="card">' in dom and '<section id="status" hidden="">' in dom


def test_real_rejected_window_is_429_until_its_reset(start_real_proxy, upstream):
    upstream.headers = unified_headers("rejected", 1.0, 1000)
    upstream.default = fail(429, "rate_limit_error", "Usage limit reached")
    proxy = start_real_proxy(max_retries=0)
    reply = proxy.chat()
    assert (reply.status, reply.error["code"]) == (429, "rate_limit_exceeded")
    assert 990 <= int(reply.headers["retry-after"]) <= 1000
    assert reply.headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert proxy.call("GET", "/v1/usage").json()["windows"]["five_hour"]["status"] == "rejected"


def test_real_extra_usage_in_use_is_refused_unless_allowed(start_real_proxy, upstream):
    upstream.headers = unified_headers("rejected", 1.0, 900, overage=True)
    proxy = start_real_proxy()
    assert proxy.chat().status == 200  # billed to extra usage: the CLI only says so afterwards
    posts = len(upstream.posts)
    refused = proxy.chat()
    assert (refused.status, refused.error["code"]) == (402, "extra_usage_in_use")
    assert 890 <= int(refused.headers["retry-after"]) <= 900 and len(upstream.posts) == posts
    assert proxy.respond().status == 402
    assert proxy.call("GET", "/v1/usage").json()["extra_usage"] == {
        "allowed": False, "in_use": True, "status": "allowed", "disabled_reason": None}
    allowed = start_real_proxy(allow_extra_usage=True)
    assert [allowed.chat().status, allowed.chat().status] == [200, 200]
    assert allowed.call("GET", "/v1/usage").json()["extra_usage"]["allowed"] is True


def test_real_extra_usage_billing_is_402_extra_usage_required(start_real_proxy, upstream):
    upstream.default = fail(400, "invalid_request_error", "Third-party apps now draw from your extra usage, not "
                                                          "your plan limits. Add more at claude.ai/settings/usage.")
    reply = start_real_proxy(max_retries=0).chat()
    assert (reply.status, reply.error["code"]) == (402, "extra_usage_required")
    assert "claude.ai/settings/usage" in reply.error["message"]


def test_real_overloaded_is_503_with_retry_after(start_real_proxy, upstream):
    upstream.default = fail(529, "overloaded_error", "Overloaded")
    reply = start_real_proxy(max_retries=0).chat()
    assert (reply.status, reply.error["code"]) == (503, "overloaded") and "retry-after" in reply.headers


def test_real_not_logged_in_is_503_saying_how_to_log_in(real_client, upstream, monkeypatch):
    monkeypatch.delenv("CLAUDE_CODE_OAUTH_TOKEN")
    reply = real_client.chat()
    assert reply.status == 503 and "log in" in reply.error["message"]
    assert reply.headers["x-should-retry"] == "false"  # the SDKs would otherwise retry it, in vain
    message = real_client.call("POST", "/v1/messages", {"model": "claude-sonnet-4", "max_tokens": 10,
                                                        "messages": [USER]})
    assert message.status == 503 and message.json()["error"]["type"] == "authentication_error"
    assert upstream.posts == []


def test_real_upstream_bad_request_is_400(start_real_proxy, upstream):
    upstream.default = fail(400, "invalid_request_error", "messages.0: something is off")
    reply = start_real_proxy(max_retries=0).chat()
    assert reply.status == 400 and "something is off" in reply.error["message"]


def test_real_prompt_too_long_is_400(real_client, upstream):
    reply = real_client.chat(messages=[{"role": "user", "content": "word " * 700_000}])
    assert (reply.status, reply.error["code"]) == (400, "context_length_exceeded")


@pytest.mark.parametrize("stream", [False, True])
def test_real_dropped_stream_that_claude_retries_is_not_duplicated(start_real_proxy, upstream, stream):
    upstream.script = [drop(["Hello "])]
    upstream.default = answer("Hello world")
    proxy = start_real_proxy(max_retries=0)
    if stream:
        _, frames = proxy.open_stream()
        assert content_of([next(frames), next(frames)]) == "Hello "  # the role chunk, then "Hello "
        upstream.release.set()
        text = "Hello " + content_of(frames)
    else:
        upstream.release.set()
        text = proxy.chat().json()["choices"][0]["message"]["content"]
    assert text == "Hello world" and len(upstream.posts) == 2


def test_real_error_after_the_stream_began_is_an_error_event_then_done(start_real_proxy, upstream):
    upstream.script = [drop(["Partial "])]
    upstream.default = answer("Something else")
    reply, frames = start_real_proxy(max_retries=0).open_stream()
    assert content_of([next(frames), next(frames)]) == "Partial "
    upstream.release.set()
    rest = list(frames)
    assert reply.status == 200 and content_of(rest) == ""
    assert rest[-2]["error"]["code"] == "upstream_stream_restarted" and rest[-1] == "[DONE]"


# Faults through the real CLI: each leaves no CLI behind, within a second of the fault.

def children_gone(idle: int) -> bool:
    """Whether this process has no more children than it had idle, within a second."""
    return wait_until(lambda: len(find_children(os.getpid())) <= idle, timeout=1.0)


def test_real_deep_schema_is_a_400_and_starts_no_cli(start_real_proxy, upstream):
    client = start_real_proxy(spares=0)
    idle = len(find_children(os.getpid()))
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": "DEEP"}}}
    reply = client.call("POST", "/v1/chat/completions", raw=body_with(body, deep_json(900)))
    assert (reply.status, reply.error["param"][:35]) == (400, "response_format.json_schema.schema.")
    assert children_gone(idle) and upstream.posts == []


def test_real_failure_after_the_spawn_stops_the_cli(start_real_proxy, upstream, monkeypatch):
    client = start_real_proxy(spares=0)
    idle = len(find_children(os.getpid()))
    spawned = []
    monkeypatch.setattr(cmp, "initialize_line", lambda session: spawned.extend(client.server.pool.running()) or 1 / 0)
    assert client.chat().status == 500
    assert spawned and not spawned[0].alive() and children_gone(idle)
    assert client.server.pool.counts()["running"] == 0


def test_real_client_that_leaves_after_the_first_token_stops_its_cli(start_real_proxy, upstream):
    upstream.default = answer(pieces=["first ", "second"], hold_after=1)
    client = start_real_proxy(spares=0, conversations=0)
    idle = len(find_children(os.getpid()))
    conn, reply = client.post_streaming("/v1/chat/completions", {"model": "sonnet", "messages": [USER]})
    seen = b""
    while b"first " not in seen:
        seen += reply.read1(65536)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # (The request's thread stops the CLI, then gives its place back.)
    assert children_gone(idle) and wait_until(lambda: client.server.pool.counts()["running"] == 0)
    upstream.release.set()


def test_real_client_that_leaves_the_queue_gets_no_cli(start_real_proxy, upstream, monkeypatch):
    monkeypatch.setattr(cmp, "QUEUE_WAIT_SECONDS", 30)
    upstream.default = stall
    client = start_real_proxy(max_concurrency=1, spares=0, conversations=0)
    holder = threading.Thread(target=client.chat)
    holder.start()
    assert upstream.posted.wait(30)
    body = json.dumps({"model": "sonnet", "messages": [{"role": "user", "content": "queued"}]}).encode()
    with socket.create_connection(("127.0.0.1", client.port)) as sock:
        sock.sendall(CHAT_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: client.server.gate.waiting == 1)
    assert wait_until(lambda: client.server.gate.waiting == 0, timeout=1.0)
    upstream.release.set()
    holder.join(30)
    assert upstream.posts and "queued" not in json.dumps([post["body"]["messages"] for post in upstream.posts])


# ── 9. main ─────────────────────────────────────────────────────────────────

def run_main(*args, env=None):
    return subprocess.run([sys.executable, str(HERE / "claude_max_proxy.py"), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_missing_cli_is_a_one_line_error_naming_the_fix(tmp_path):
    done = run_main("--claude", str(tmp_path / "no-such-claude"), "--port", "0")
    assert done.returncode == 2
    assert "npm install -g @anthropic-ai/claude-code" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_broken_cli_is_a_one_line_error(tmp_path):
    broken = tmp_path / "claude"
    broken.write_text("#!/bin/sh\necho 'cannot execute binary file' >&2\nexit 126\n")
    broken.chmod(0o755)
    done = run_main("--claude", str(broken), "--port", "0")
    assert done.returncode == 2 and "status 126" in done.stderr and "Traceback" not in done.stderr


def test_network_address_without_api_key_is_refused():
    done = run_main("--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2 and "--api-key" in done.stderr


def find_children(pid: int) -> list:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.split(")")[-1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


class ProxyProgram:
    """claude_max_proxy.py run as users run it, in a process of its own, its log kept."""

    def __init__(self, claude: str, *options: str, env=None):
        self.process = subprocess.Popen([sys.executable, str(HERE / "claude_max_proxy.py"), "--claude", claude,
                                         "--port", "0", *options], stderr=subprocess.PIPE, text=True, env=env)
        self.log: list = []
        for line in self.process.stderr:
            self.log.append(line)
            if " on http://" in line:
                break
        else:
            raise AssertionError("the proxy did not start: " + "".join(self.log))
        self.port = int(line.split("127.0.0.1:")[1].split("/")[0])
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def connect(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def post(self, path: str, body: dict, headers=None) -> http.client.HTTPResponse:
        conn = self.connect()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        return conn.getresponse()

    def processes(self) -> dict:
        with self.connect() as conn:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())["processes"]

    def held(self) -> tuple:
        """What it holds: CLI children, threads, open descriptors."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)[1])
        return len(find_children(self.process.pid)), threads, len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE)[1]) / 1024

    def stop(self):
        self.process.kill()
        self.process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_server_and_every_cli_child(upstream, real_cli, signum):
    upstream.default = stall
    proxy = ProxyProgram(real_cli, env=dict(os.environ, ANTHROPIC_API_KEY="sk-ant-should-go"))
    try:
        assert any("ANTHROPIC_API_KEY removed" in line for line in proxy.log)
        conn = proxy.connect(timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "sonnet", "messages": [USER], "stream": True}), {"Content-Type": "application/json"})
        assert upstream.posted.wait(10)
        children = find_children(proxy.process.pid)  # the request's CLI, and maybe a spare started since
        assert children
        proxy.process.send_signal(signum)
        assert proxy.process.wait(cmp.SHUTDOWN_GRACE_SECONDS + 5) == 0
        assert not any(pid_alive(child) for child in children)
        reply = conn.getresponse()
        assert reply.status == 503 and json.loads(reply.read())["error"]["code"] == "shutting_down"
    finally:
        proxy.stop()


def test_the_program_answers_without_loading_openssl(fake):
    """Run as users run it, the proxy leaves OpenSSL unloaded (README, "Memory"), and still checks keys."""
    proxy = ProxyProgram(fake.path, "--api-key", "k")
    try:
        for key, status in (("k", 200), ("wrong", 401)):
            reply = proxy.post("/v1/chat/completions", {"model": "sonnet", "messages": [USER]},
                               {"Authorization": f"Bearer {key}"})
            assert reply.status == status
        maps = Path(f"/proc/{proxy.process.pid}/maps").read_text()
        assert "libcrypto" not in maps and "libssl" not in maps
    finally:
        proxy.stop()


LOAD_CLIENTS = 50


def streamed_reply(proxy: ProxyProgram, number: int) -> tuple:
    """(status, what the client could tell of it) for one streaming chat, read to its end."""
    reply = proxy.post("/v1/chat/completions", {"model": "sonnet", "stream": True, "messages": [
        {"role": "user", "content": f"client {number}"}]})
    data = reply.read()  # raises if the stream was cut: a chunked body must end with its last chunk
    if reply.status != 200:
        return reply.status, (json.loads(data)["error"]["code"], reply.getheader("Retry-After"))
    frames = [line[len(b"data: "):] for line in data.split(b"\n") if line.startswith(b"data: ")]
    assert frames[-1] == b"[DONE]", data[-300:]
    chunks = [json.loads(frame) for frame in frames[:-1]]
    errors = [chunk["error"]["code"] for chunk in chunks if "error" in chunk]
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk.get("choices", ()))
    return 200, errors[0] if errors else text


def load(proxy: ProxyProgram, during=lambda: None) -> list:
    """LOAD_CLIENTS streaming clients at once; `during` runs once they are all under way."""
    results: list = []
    clients = [threading.Thread(target=lambda n=n: results.append(streamed_reply(proxy, n)))
               for n in range(LOAD_CLIENTS)]
    for client in clients:
        client.start()
    during()
    for client in clients:
        client.join(120)
    assert not any(client.is_alive() for client in clients), "a client hangs"
    assert len(results) == LOAD_CLIENTS, "a client got no answer"
    return results


@pytest.mark.parametrize("pool", ["pool off", "pool on"])
def test_fifty_streaming_clients_against_four_slots(upstream, real_cli, pool):
    options = ["--spares", "0", "--conversations", "0"] if pool == "pool off" else [
        "--spare-timeout", "1", "--conversation-timeout", "1"]  # so that afterwards the pool empties
    proxy = ProxyProgram(real_cli, "--max-concurrency", "4", *options)
    try:
        assert streamed_reply(proxy, 0) == (200, "Hello from fake upstream.")
        assert wait_until(lambda: proxy.held()[0] == 0, timeout=10)
        idle, idle_rss = proxy.held(), proxy.rss_mb()
        results = load(proxy)
        served = [result for result in results if result[0] == 200]
        assert len(served) >= 4 and all(text == "Hello from fake upstream." for _, text in served)
        assert all(result == (429, ("server_busy", str(cmp.BUSY_RETRY_SECONDS))) for result in results
                   if result[0] != 200)
        assert wait_until(lambda: proxy.held() <= idle, timeout=15), (proxy.held(), idle)
        assert proxy.rss_mb() < idle_rss + 20
    finally:
        proxy.stop()


def test_sigterm_under_load_ends_every_request_cleanly_and_leaves_no_cli(upstream, real_cli):
    upstream.default = stall  # every request is under way when the signal comes
    proxy = ProxyProgram(real_cli, "--max-concurrency", "4")
    clis: list = []
    stopped: list = []

    def terminate():
        assert wait_until(lambda: len(find_children(proxy.process.pid)) >= 4, timeout=30)
        clis.extend(find_children(proxy.process.pid))
        proxy.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proxy.process.wait(2 * cmp.SHUTDOWN_GRACE_SECONDS + 5)
        stopped.append(time.monotonic() - started)
    try:
        results = load(proxy, during=terminate)
        assert stopped[0] < 2 * cmp.SHUTDOWN_GRACE_SECONDS + 2 and proxy.process.returncode == 0
        assert not any(pid_alive(cli) for cli in clis)
        # Each one refused, or ended with a clean error: as a status before the stream began, else as its last frame.
        assert {result for result in results} <= {(429, ("server_busy", str(cmp.BUSY_RETRY_SECONDS))),
                                                 (503, ("shutting_down", None)), (200, "shutting_down")}
    finally:
        upstream.release.set()
        proxy.stop()


def test_make_installs_a_launch_agent_that_runs_this_file(tmp_path):
    import plistlib
    home = tmp_path / "home"
    done = subprocess.run(["make", "-C", str(HERE), "install-launchagent", f"HOME={home}", "LAUNCHCTL=true"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    agent = plistlib.loads((home / "Library" / "LaunchAgents" / "com.claude-max-api.plist").read_bytes())
    assert agent["Label"] == "com.claude-max-api" and agent["KeepAlive"] and agent["RunAtLoad"]
    assert agent["ProgramArguments"] == ["/usr/bin/python3", str(HERE / "claude_max_proxy.py")]
    assert agent["StandardErrorPath"] == str(home / "Library" / "Logs" / "claude-max-proxy.log")
    assert f"{home}/.npm-global/bin" in agent["EnvironmentVariables"]["PATH"].split(":")
    assert "/opt/homebrew/bin" in agent["EnvironmentVariables"]["PATH"].split(":")
    subprocess.run(["make", "-C", str(HERE), "uninstall-launchagent", f"HOME={home}", "LAUNCHCTL=true"],
                   check=True, capture_output=True)
    assert not (home / "Library" / "LaunchAgents" / "com.claude-max-api.plist").exists()


def test_make_installs_a_systemd_user_unit_that_runs_this_file_with_this_python(tmp_path):
    home = tmp_path / "home"
    make = ["make", "-C", str(HERE), f"HOME={home}", f"PYTHON={sys.executable}", "SYSTEMCTL=echo systemctl --user"]
    done = subprocess.run([*make, "install-systemd"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "systemctl --user enable claude-max-proxy.service" in done.stdout
    assert "systemctl --user restart claude-max-proxy.service" in done.stdout
    unit_path = home / ".config" / "systemd" / "user" / "claude-max-proxy.service"
    unit = unit_path.read_text()
    assert f'\nExecStart="{sys.executable}" "{HERE / "claude_max_proxy.py"}"\n' in unit
    assert "\nRestart=on-failure\n" in unit and "\nEnvironmentFile=-%h/.config/claude-max-proxy/env\n" in unit
    options = home / ".config" / "claude-max-proxy" / "env"
    assert options.stat().st_mode & 0o777 == 0o600 and "CLAUDE_MAX_PROXY_" in options.read_text()
    options.write_text("CLAUDE_MAX_PROXY_PORT=4000\n")
    assert subprocess.run([*make, "install-systemd"], capture_output=True).returncode == 0
    assert options.read_text() == "CLAUDE_MAX_PROXY_PORT=4000\n"  # the user's options are kept
    verify = shutil.which("systemd-analyze")
    if verify:  # as systemd reads it: the interpreter must exist, and every key be known
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        checked = subprocess.run([verify, "verify", "--user", str(unit_path)], capture_output=True, text=True,
                                 env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(home)})
        assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
    done = subprocess.run([*make, "uninstall-systemd"], capture_output=True, text=True)
    assert "systemctl --user disable --now claude-max-proxy.service" in done.stdout and not unit_path.exists()


# Function calling and structured output through the real CLI.

def assembled(frames) -> dict:
    """The assistant message a client builds from streamed chunks."""
    calls: dict = {}
    for frame in frames:
        if not isinstance(frame, dict) or not frame["choices"]:
            continue
        for fragment in frame["choices"][0]["delta"].get("tool_calls", []):
            call = calls.setdefault(fragment["index"], {"id": None, "type": "function",
                                                        "function": {"name": "", "arguments": ""}})
            call["id"] = fragment.get("id") or call["id"]
            call["function"]["name"] += fragment["function"].get("name", "")
            call["function"]["arguments"] += fragment["function"]["arguments"]
    return {"role": "assistant", "content": content_of(frames) or None, "tool_calls": list(calls.values())}


@pytest.mark.parametrize("stream", [False, True])
def test_real_tool_round_trip(real_client, upstream, stream):
    upstream.script = [tool_use(("toolu_1", "get_weather", {"city": "Zürich"}), ("toolu_2", "get_time", {}),
                                text="Let me check.", pause=0.5)]
    upstream.default = answer("Sunny at noon.")
    question = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather and time?"}]
    if stream:
        _, frames = real_client.stream(tools=[WEATHER, CLOCK], messages=question)
        message, finish = assembled(frames), [f["choices"][0]["finish_reason"] for f in frames
                                              if isinstance(f, dict) and f["choices"]][-1]
    else:
        choice = real_client.chat(tools=[WEATHER, CLOCK], messages=question).json()["choices"][0]
        message, finish = choice["message"], choice["finish_reason"]

    # What Claude was offered: the client's tools, as defined; nothing of Claude Code's own.
    offered = {tool["name"]: tool for tool in upstream.posts[0]["body"]["tools"]}
    assert offered.pop("get_weather") == {"name": "get_weather", "description": "Weather for a city.",
                                          "input_schema": WEATHER["function"]["parameters"]}
    assert offered.pop("get_time")["input_schema"] == {"type": "object", "properties": {}}
    assert [tool.get("defer_loading") for tool in offered.values()] == [True]  # the CLI's inert placeholder
    # What the client got: both calls (the second came 0.5 s after the first), and one upstream call.
    assert len(upstream.posts) == 1 and finish == "tool_calls"
    assert message["content"] == "Let me check."
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] \
        == [("toolu_1", "get_weather", {"city": "Zürich"}), ("toolu_2", "get_time", {})]

    results = [{"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
               {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]}]
    reply = real_client.chat(tools=[WEATHER, CLOCK], messages=[*question, message, *results])
    assert reply.json()["choices"][0]["message"]["content"] == "Sunny at noon."
    turns = [m for m in upstream.last["messages"] if m["role"] != "system"]
    assert [block["type"] for block in turns[1]["content"]] == ["text", "tool_use", "tool_use"]
    assert [(b["id"], b["name"], b["input"]) for b in turns[1]["content"][1:]] == [
        ("toolu_1", "get_weather", {"city": "Zürich"}), ("toolu_2", "get_time", {})]
    assert [(b["tool_use_id"], b["content"]) for b in turns[2]["content"] if b["type"] == "tool_result"] == [
        ("toolu_1", texts("sunny")), ("toolu_2", texts("noon"))]


def as_replayed(messages: list) -> list:
    """The user and assistant turns the upstream got, as a fresh CLI sends them: the CLI's own
    system notes, thinking and prompt-cache marks aside (where it puts them differs)."""
    turns = []
    for message in messages:
        if message["role"] == "system":
            continue
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        turns.append((message["role"], [without_cache_marks(block) for block in blocks
                                        if block["type"] not in ("thinking", "redacted_thinking")]))
    return turns


def session_of(post: dict) -> str:
    """The CLI session that made an upstream call: one per CLI process."""
    return post["headers"]["x-claude-code-session-id"]


def test_real_a_continued_chat_reaches_upstream_as_a_replay_would(start_real_proxy, upstream):
    upstream.default = answer("Paris.")
    turns = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"}]
    for proxy in (start_real_proxy(), start_real_proxy(conversations=0, spares=0)):  # continued, then replayed
        assert proxy.chat(messages=turns[:1]).status == 200
        assert proxy.chat(messages=turns).json()["choices"][0]["message"]["content"] == "Paris."
    continued, replayed = upstream.posts[1], upstream.posts[3]
    assert as_replayed(continued["body"]["messages"]) == as_replayed(replayed["body"]["messages"])
    assert [role for role, _ in as_replayed(continued["body"]["messages"])] == ["user", "assistant", "user"]
    assert session_of(upstream.posts[0]) == session_of(continued)  # the same CLI, given only the new question
    assert session_of(upstream.posts[2]) != session_of(replayed)


def test_real_a_continued_tool_step_reaches_upstream_as_a_replay_would_with_its_thinking(start_real_proxy,
                                                                                       upstream):
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    for proxy in (start_real_proxy(), start_real_proxy(conversations=0, spares=0)):  # continued, then replayed
        upstream.script = [tool_use(("toolu_o1", "get_weather", {"city": "Oslo"}), thinking="I should look.")]
        upstream.default = answer("Sunny in Oslo.")
        message = proxy.chat(tools=[WEATHER], messages=question).json()["choices"][0]["message"]
        follow_up = [*question, message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"],
                                          "content": "sunny"}]
        assert proxy.chat(tools=[WEATHER], messages=follow_up).json()["choices"][0]["message"]["content"] \
            == "Sunny in Oslo."
    continued, replayed = upstream.posts[1], upstream.posts[3]
    assert as_replayed(continued["body"]["messages"]) == as_replayed(replayed["body"]["messages"])
    assert as_replayed(continued["body"]["messages"])[2] == ("user", [
        {"type": "tool_result", "tool_use_id": "toolu_o1", "content": texts("sunny")}])
    assert session_of(upstream.posts[0]) == session_of(continued)
    # The live step keeps Claude's thinking, and thinking on; a replay has lost it, and turns it off.
    [assistant] = [m for m in continued["body"]["messages"] if m["role"] == "assistant"]
    assert assistant["content"][0] == {"type": "thinking", "thinking": "I should look.", "signature": "c2lnbmVk"}
    assert "thinking" in continued["body"] and "thinking" not in replayed["body"]


@pytest.mark.parametrize("stream", [False, True])
def test_real_a_whole_call_survives_a_broken_stream(real_client, upstream, stream):
    upstream.script = [tool_use_then_drop]
    if stream:
        _, frames = real_client.stream(tools=[CLOCK])
        message = assembled(frames)
    else:
        message = real_client.chat(tools=[CLOCK]).json()["choices"][0]["message"]
    assert [(call["id"], call["function"]["arguments"]) for call in message["tool_calls"]] == [("toolu_kept", "{}")]
    assert len(upstream.posts) == 1


def test_real_tool_history_reaches_upstream_without_tools(real_client, upstream):
    reply = real_client.chat(tool_choice="none", tools=[WEATHER],
                             messages=[USER, CALL, RESULT, {"role": "user", "content": "So?"}])
    assert reply.status == 200 and upstream.last["tools"] == []
    turns = [m for m in upstream.last["messages"] if m["role"] != "system"]
    assert turns[1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                    "input": {"city": "Rome"}}]
    assert turns[2]["content"][0] == {"type": "tool_result", "tool_use_id": "call_1", "content": texts("sunny")}


@pytest.mark.parametrize("stream", [False, True])
def test_real_structured_output(real_client, upstream, stream):
    upstream.script = [tool_use(("toolu_s", "StructuredOutput", {"name": "Alice"}), text="Here it is.")]
    content, finish = text_and_finish(real_client, stream, response_format=SCHEMA_FORMAT)
    assert (json.loads(content), finish) == ({"name": "Alice"}, "stop")
    structured = [tool for tool in upstream.posts[0]["body"]["tools"] if not tool.get("defer_loading")]
    assert [(t["name"], t["input_schema"]) for t in structured] == [
        ("StructuredOutput", SCHEMA_FORMAT["json_schema"]["schema"])]


def test_real_schema_the_cli_rejects_is_a_400(real_client, upstream):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}
    reply = real_client.chat(tools=[bad, CLOCK])
    assert (reply.status, reply.error["code"]) == (400, "invalid_tool_schema")
    assert "rejected the JSON schema of f;" in reply.error["message"]


# The Responses API through the real CLI.

def test_real_responses_items_reach_upstream_as_roles_and_blocks(real_client, upstream):
    reply = real_client.respond(instructions="INSTRUCTIONS-MARKER", tools=[dict(WEATHER["function"], type="function")],
                                input=[
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "DEVELOPER-MARKER"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Rome?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_r", "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"},
        {"type": "function_call_output", "call_id": "call_r", "output": "sunny"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks."}]}])
    assert reply.status == 200 and reply.json()["output_text"] == "Hello from fake upstream."
    assert "INSTRUCTIONS-MARKER\\n\\nDEVELOPER-MARKER" in json.dumps(upstream.last["system"])
    turns = [m for m in upstream.last["messages"] if m["role"] != "system"]
    assert [m["role"] for m in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == [{"type": "text", "text": "Checking."}, {
        "type": "tool_use", "id": "call_r", "name": "get_weather", "input": {"city": "Rome"}}]
    assert turns[2]["content"][0] == {"type": "tool_result", "tool_use_id": "call_r", "content": texts("sunny")}
    assert user_texts(upstream.last) == [["Weather in Rome?"], ["Thanks."]]


@pytest.mark.parametrize("stream", [False, True])
def test_real_responses_function_call_round_trip(real_client, upstream, stream):
    upstream.script = [tool_use(("toolu_01Rt", "get_weather", {"city": "Oslo"}))]
    upstream.default = answer("Sunny in Oslo.")
    tools = [dict(WEATHER["function"], type="function")]
    if stream:
        _, events = real_client.respond_streaming(tools=tools, input="Weather in Oslo?")
        first = events[-1][1]["response"]
    else:
        first = real_client.respond(tools=tools, input="Weather in Oslo?").json()
    call = first["output"][0]
    assert (call["type"], call["call_id"], call["name"], json.loads(call["arguments"])) == (
        "function_call", "call_01Rt", "get_weather", {"city": "Oslo"})
    # As openai-agents sends it: only the output, and the stored response supplies the rest.
    final = real_client.respond(tools=tools, previous_response_id=first["id"], input=[
        {"type": "function_call_output", "call_id": "call_01Rt", "output": "sunny"}]).json()
    assert final["output_text"] == "Sunny in Oslo."
    # The CLI held Claude's call, and went on with the result: Claude's own id, not the client's.
    turns = [m for m in upstream.last["messages"] if m["role"] != "system"]
    assert turns[1]["content"] == [{"type": "tool_use", "id": "toolu_01Rt", "name": "get_weather",
                                    "input": {"city": "Oslo"}}]
    assert [without_cache_marks(block) for block in turns[2]["content"]] == [
        {"type": "tool_result", "tool_use_id": "toolu_01Rt", "content": texts("sunny")}]


# ── the Messages API ────────────────────────────────────────────────────────

WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_messages_request_keeps_claudes_blocks_and_drops_the_clients_thinking():
    request = cmp.parse_messages_request({
        "model": "claude-sonnet-4", "max_tokens": 4096, "system": [{"type": "text", "text": "Be terse."}],
        "stop_sequences": ["END"], "thinking": {"type": "enabled", "budget_tokens": 2048},
        "tools": [WEATHER_TOOL], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hm.", "signature": "c2ln"},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "text", "text": "There."},
                                         {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                          "content": [{"type": "text", "text": "no network"}]}]}]})
    chat = request.chat
    assert request.shows_thinking and chat.one_tool_call and chat.stop == ("END",)
    assert chat.launch == cmp.LaunchSettings("sonnet", max_tokens=4096)
    assert chat.session.system_prompt == "Be terse." and [t.name for t in chat.session.tools] == ["get_weather"]
    assert chat.history[1].content == [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                        "input": {"city": "Oslo"}}]
    assert chat.prompt.content == [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                    "content": texts("no network")}, {"type": "text", "text": "There."}]


def test_messages_tool_choice_and_disabled_thinking():
    base = {"model": "sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
            "tools": [WEATHER_TOOL, dict(WEATHER_TOOL, name="get_time")]}
    named = cmp.parse_messages_request(dict(base, tool_choice={"type": "tool", "name": "get_time"})).chat
    assert [t.name for t in named.session.tools] == ["get_time"]
    assert named.session.system_prompt == "Respond by calling the function `get_time`."
    assert cmp.parse_messages_request(dict(base, tool_choice={"type": "none"})).chat.session.tools == ()
    quiet = cmp.parse_messages_request(dict(base, thinking={"type": "disabled"}))
    assert not quiet.shows_thinking and quiet.chat.launch.thinking is False
    # Left out, thinking is the model's default (adaptive on Claude's current models), and not shown.
    default = cmp.parse_messages_request(base)
    assert not default.shows_thinking and default.chat.launch.thinking is True
    omitted = cmp.parse_messages_request(dict(base, thinking={"type": "adaptive", "display": "omitted"}))
    assert not omitted.shows_thinking and omitted.chat.launch.thinking is True


def test_messages_output_config_is_structured_output_and_effort():
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    base = {"model": "sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "A film?"}]}
    chat = cmp.parse_messages_request(dict(base, output_config={
        "effort": "low", "format": {"type": "json_schema", "schema": schema}})).chat
    assert chat.session.output_schema == schema and chat.launch.effort == "low"
    older = cmp.parse_messages_request(dict(base, output_format={"type": "json_schema", "schema": schema})).chat
    assert older.session.output_schema == schema and older.launch.effort is None


@pytest.mark.parametrize("change, message", [
    ({"max_tokens": None}, "'max_tokens' is required"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}]},
     "cannot go on with a prefilled assistant turn"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "one of Anthropic's own tools"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "give it as a tool with a 'name' and an 'input_schema'"),
    ({"tools": [dict(WEATHER_TOOL, input_schema={"type": "string"})]}, "tools[0].input_schema must be"),
    ({"stop_sequences": [""]}, "'stop_sequences' must be"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "!!"}}]}]}, "source.data has no valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "has type 'document'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}, {"role": "user", "content": "b"}]},
     "has no tool_result answering it"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9"}]}]},
     "answers tool_use_id 't9', which no tool call"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "document", "source": {}}]}]}]},
     "has type 'document'; a tool_result takes text and image blocks"),
    ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "budget_tokens' must be at least 1024"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 1024},
     "'max_tokens' must be greater than 'thinking.budget_tokens'"),
    ({"thinking": {"type": "adaptive"}, "tools": [WEATHER_TOOL], "tool_choice": {"type": "any"}},
     "Thinking may not be enabled when 'tool_choice' forces tool use"),
    ({"output_config": {"format": {"type": "json_object"}}}, "'output_config.format' must be"),
    ({"output_format": {"type": "json_schema", "schema": {"type": "object"}}, "tools": [dict(
        WEATHER_TOOL, name="StructuredOutput")]}, "A tool named StructuredOutput cannot be used with 'output_format'"),
    ({"output_config": {"effort": "extreme"}}, "'output_config.effort' must be one of high, low, max, medium"),
])
def test_messages_request_errors(change, message):
    body = {"model": "sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(ApiError) as caught:
        cmp.parse_messages_request({k: v for k, v in body.items() if v is not None})
    assert caught.value.status == 400 and message in caught.value.message
    assert caught.value.anthropic_body() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": caught.value.message}}


def test_message_builder_streams_anthropics_events_in_order():
    builder = cmp.MessageBuilder("claude-sonnet-4", shows_thinking=True)
    end = TurnEnd("tool_use", Usage(10, 5, 2, 1), "Hi there", "Hm.",
                  (cmp.ToolCall("toolu_1", "get_weather", '{"city": "Oslo"}'),), signature="c2ln")
    frames = builder.start(TurnStart(Usage(10, 1, 2, 1)))
    for event in (TextDelta("Hm.", reasoning=True), ThinkingSignature("c2ln"), TextDelta("Hi"), TextDelta(" there"),
                  cmp.ToolCallDelta(0, '{"city": ', id="toolu_1", name="get_weather"),
                  cmp.ToolCallDelta(0, '"Oslo"}'), end):
        frames += builder.feed(event)
    assert [(f["type"], f.get("index")) for f in frames] == [
        ("message_start", None), ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
        ("content_block_delta", 1), ("content_block_stop", 1), ("content_block_start", 2),
        ("content_block_delta", 2), ("content_block_delta", 2), ("content_block_stop", 2), ("message_delta", None),
        ("message_stop", None)]
    assert frames[0]["message"]["usage"] == {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 2,
                                             "cache_creation_input_tokens": 1}
    assert frames[3]["delta"] == {"type": "signature_delta", "signature": "c2ln"}
    assert frames[9]["content_block"] == {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    assert frames[11]["delta"] == {"type": "input_json_delta", "partial_json": '"Oslo"}'}
    assert frames[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert frames[-2]["usage"] == {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2,
                                   "cache_creation_input_tokens": 1}
    assert builder.sse(frames[-1]) == b'event: message_stop\ndata: {"type": "message_stop"}\n\n'
    whole = builder.whole(end)
    assert whole["content"] == [{"type": "thinking", "thinking": "Hm.", "signature": "c2ln"},
                                {"type": "text", "text": "Hi there"},
                                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]


def test_message_builder_hides_thinking_nobody_asked_for():
    builder = cmp.MessageBuilder("sonnet")
    frames = [frame for event in (TextDelta("Hm.", reasoning=True), ThinkingSignature("c2ln"), TextDelta("Hi"))
              for frame in builder.feed(event)]
    assert [f["type"] for f in frames] == ["content_block_start", "content_block_delta"]
    assert frames[0] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert builder.whole(TurnEnd("end_turn", Usage(), "Hi", "Hm."))["content"] == [{"type": "text", "text": "Hi"}]


def test_stop_sequence_found_is_the_messages_stop_sequence():
    translator = TurnTranslator(stop=["STOP", "END"])
    events = [{"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
                                                 "delta": {"type": "text_delta", "text": "one END two STOP"}}}]
    out = [item for event in events for item in translator.feed(event)]
    assert out == [TextDelta("one ")] and translator.ended_by == "stop_sequence"
    end = translator.feed({"type": "result", "subtype": "success", "is_error": False, "result": "",
                           "usage": {"input_tokens": 1, "output_tokens": 2}})[-1]
    assert (end.stop_reason, end.stop_sequence) == ("stop_sequence", "END")
    assert cmp.MessageBuilder("sonnet").whole(end)["stop_sequence"] == "END"


def test_real_messages_api_answers_streams_and_fails_in_anthropics_shapes(start_real_proxy, upstream):
    client = start_real_proxy(api_key="sekrit")
    upstream.default = answer(pieces=["Hel", "lo"], thinking="Hmm.")
    key = {"x-api-key": "sekrit", "anthropic-version": "2023-06-01"}
    body = {"model": "claude-sonnet-4", "max_tokens": 100, "system": "Be brief.",
            "messages": [{"role": "user", "content": "Say hello"}]}
    reply = client.call("POST", "/v1/messages", body, headers=key)
    message = reply.json()
    assert reply.status == 200 and message["type"] == "message" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "text", "text": "Hello"}] and message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 0,
                                "cache_creation_input_tokens": 0}
    assert user_texts(upstream.last) == [["Say hello"]]
    assert "Be brief." in json.dumps(upstream.last["system"])
    reply, events = client.named_events("/messages", dict(body, thinking={"type": "adaptive"}), headers=key)
    assert reply.status == 200 and all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert deltas[:2] == [{"type": "thinking_delta", "thinking": "Hmm."},
                          {"type": "signature_delta", "signature": "c2ln"}]
    assert "".join(d.get("text", "") for d in deltas) == "Hello"
    assert events[0][1]["message"]["usage"]["input_tokens"] == 10  # Claude's input, as its message began
    assert events[-2][1]["usage"]["input_tokens"] == 10
    refused = client.call("POST", "/v1/messages", body, headers={"x-api-key": "wrong"})
    assert refused.status == 401 and refused.json()["error"]["type"] == "authentication_error"
    bad = client.call("POST", "/v1/messages", dict(body, max_tokens=0), headers=key)
    assert bad.status == 400 and bad.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "'max_tokens' is required, and must be at least 1."}}
    counted = client.call("POST", "/v1/messages/count_tokens", body, headers=key)
    assert counted.status == 404 and "cannot count tokens" in counted.json()["error"]["message"]
    assert counted.headers["request-id"] == counted.headers["x-request-id"]  # where Anthropic's SDKs look
    batches = client.call("POST", "/v1/messages/batches", body, headers=key)  # a route we do not serve
    assert batches.status == 404 and batches.json()["error"]["type"] == "not_found_error"


def test_real_messages_tool_round_trip_goes_on_in_the_same_cli(real_client, upstream, caplog):
    caplog.set_level("INFO", logger="claude-max-proxy")
    upstream.script = [tool_use(("toolu_01Ms", "get_weather", {"city": "Oslo"}))]
    upstream.default = answer("Sunny in Oslo.")
    # (Sonnet 4.5 is one of the models after whose tool results the CLI would note the tokens left.)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "Weather in Oslo?"}]}
    _, events = real_client.named_events("/v1/messages", body)
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert starts == [{"type": "tool_use", "id": "toolu_01Ms", "name": "get_weather", "input": {}}]
    arguments = "".join(data["delta"]["partial_json"] for name, data in events if name == "content_block_delta")
    assert json.loads(arguments) == {"city": "Oslo"} and events[-2][1]["delta"]["stop_reason"] == "tool_use"
    body["messages"] += [
        {"role": "assistant", "content": [dict(starts[0], input={"city": "Oslo"})]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01Ms", "content": "sunny"}]}]
    final = real_client.call("POST", "/v1/messages", dict(body, stream=False)).json()
    assert final["content"] == [{"type": "text", "text": "Sunny in Oslo."}]
    assert served(caplog, 2) == ["cold", "continued"]  # the CLI held Claude's call, and took its result
    turns = [m for m in upstream.last["messages"] if m["role"] != "system"]
    assert [without_cache_marks(block) for block in turns[2]["content"]] == [
        {"type": "tool_result", "tool_use_id": "toolu_01Ms", "content": texts("sunny")}]


def test_real_messages_errors_are_anthropics_before_and_after_the_stream_began(start_real_proxy, upstream):
    client = start_real_proxy(max_retries=0)
    body = {"model": "claude-sonnet-4", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
    upstream.script = [fail(529, "overloaded_error", "Overloaded")]
    overloaded = client.call("POST", "/v1/messages", body)
    assert overloaded.status == 503 and overloaded.json()["error"]["type"] == "overloaded_error"
    assert "retry-after" in overloaded.headers
    upstream.script = [drop(["Partial "])]
    upstream.default = answer("Something else")  # Claude's retry writes another answer
    conn, reply = client.post_streaming("/v1/messages", body)
    seen = b""
    while b"Partial " not in seen:
        seen += reply.readline()
    upstream.release.set()
    rest = reply.read().decode()
    conn.close()
    assert reply.status == 200 and "message_stop" not in rest
    assert rest.endswith("\n\n") and rest.rstrip().splitlines()[-2:] == [
        "event: error", 'data: {"type": "error", "error": {"type": "api_error", "message": "The upstream stream '
        "broke off and Claude's retry wrote a different answer, so what was already sent is incomplete; retry the "
        'request."}}']


@pytest.mark.parametrize("stream", [False, True])
def test_real_messages_output_config_format_is_answered_in_json(real_client, upstream, stream):
    # As LangChain's with_structured_output(method="json_schema") asks for it.
    upstream.script = [tool_use(("toolu_s", "StructuredOutput", {"name": "Alice"}), text="Here it is.")]
    schema = SCHEMA_FORMAT["json_schema"]["schema"]
    body = {"model": "claude-sonnet-4", "max_tokens": 100, "messages": [{"role": "user", "content": "Who?"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    if stream:
        _, events = real_client.named_events("/v1/messages", body)
        text = "".join(data["delta"].get("text", "") for name, data in events if name == "content_block_delta")
        stop_reason = next(data for name, data in events if name == "message_delta")["delta"]["stop_reason"]
    else:
        message = real_client.call("POST", "/v1/messages", body).json()
        assert [block["type"] for block in message["content"]] == ["text"]
        text, stop_reason = message["content"][0]["text"], message["stop_reason"]
    assert (json.loads(text), stop_reason) == ({"name": "Alice"}, "end_turn")
    structured = [tool for tool in upstream.posts[0]["body"]["tools"] if not tool.get("defer_loading")]
    assert [(t["name"], t["input_schema"]) for t in structured] == [("StructuredOutput", schema)]
