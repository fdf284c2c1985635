"""claude-max-proxy: OpenAI's Chat Completions and Responses APIs over the Claude Code CLI.

Run `python3 claude_max_proxy.py` and point any OpenAI-compatible tool at
http://127.0.0.1:3456/v1. Each request drives the official `claude -p` in
stream-json mode, so it is served by the user's own Claude subscription.
A pool keeps a few CLIs alive within one budget: spares started ahead of
need, and the CLIs of finished conversations, which a request that goes on
with one continues in place, tool calls included (section 5).

Sections, in the order a request travels:
  1 Configuration   2 Errors   3 Models   4 The OpenAI request (pure)
  5 The CLI process (I/O)   6 Claude's events (pure)
  7 The OpenAI response (pure)   8 The HTTP server (I/O)   9 main
One thread per connection, and two per CLI child (a stdout reader, a stdin
writer), so a request thread never blocks on a pipe and can watch its deadline
and its client. Requests share the read-only Config and, behind locks on the
server object, the admission gate, the process pool and the
stored Responses API responses. A Responses API request is turned into a chat
request (section 4), and the turn's events into its items (section 7).
Not supported: n > 1, logprobs, audio, files, OpenAI's hosted tools.
Standard library only, Python 3.9 to 3.13.
"""
from __future__ import annotations

import sys

# Run as a program, the proxy never speaks TLS and hashes with BLAKE2, which
# Python builds in: keeping http.client from importing ssl, and hashlib from
# loading OpenSSL, saves about 4.5 MB of its 32 (README, "Memory"). Imported as
# a module, by the tests or anyone, it leaves the importer's modules alone.
if __name__ == "__main__":
    sys.modules.setdefault("ssl", None)
    sys.modules.setdefault("_hashlib", None)

import argparse
import base64
import binascii
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import queue
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from contextlib import closing, contextmanager
from dataclasses import asdict, astuple, dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import unquote, urlsplit

__version__ = "1.3.0"

log = logging.getLogger("claude-max-proxy")


# ── 1. Configuration: argv + environment → Config ───────────────────────────

ENV_PREFIX = "CLAUDE_MAX_PROXY_"
LOG_LEVELS = ("debug", "info", "warning", "error")
INSTALL_HINT = "npm install -g @anthropic-ai/claude-code"


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 3456
    claude: str = "claude"
    api_key: Optional[str] = None
    cors_origins: Tuple[str, ...] = ()
    allowed_hosts: Tuple[str, ...] = ()
    max_concurrency: int = 4
    max_processes: int = 8
    spares: int = 1
    conversations: int = 4
    spare_timeout: float = 600.0
    conversation_timeout: float = 600.0
    timeout: float = 600.0
    read_timeout: float = 60.0
    max_retries: int = 2
    use_api_key: bool = False
    allow_extra_usage: bool = False
    allow_unauthenticated_remote: bool = False
    log_level: str = "info"


def _env_list(value: Optional[str]) -> List[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _env_flag(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parse_config(argv: Optional[Sequence[str]], environ: Mapping[str, str]) -> Config:
    """Read options from argv, falling back to CLAUDE_MAX_PROXY_* variables."""
    env = lambda name: environ.get(ENV_PREFIX + name)  # noqa: E731
    parser = _option_parser(env)
    # String defaults (from the environment) go through type= like typed values,
    # so CLAUDE_MAX_PROXY_PORT=abc is a usage error, not a traceback.
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.log_level not in LOG_LEVELS:  # argparse checks choices only on the command line
        parser.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    if args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    if args.max_processes is None:
        args.max_processes = max(Config.max_processes, args.max_concurrency)
    if args.max_processes < args.max_concurrency:
        parser.error("--max-processes must be at least --max-concurrency: each running request has a CLI")
    if args.spares < 0 or args.conversations < 0:
        parser.error("--spares and --conversations must not be negative")
    if min(args.timeout, args.read_timeout, args.spare_timeout, args.conversation_timeout) <= 0:
        parser.error("--timeout, --read-timeout, --spare-timeout and --conversation-timeout must be positive")
    if args.max_retries < 0:
        parser.error("--max-retries must not be negative")
    return Config(
        host=args.host, port=args.port, api_key=args.api_key or None,
        # A path, made absolute: each CLI runs in a directory of its own.
        claude=os.path.abspath(args.claude) if os.sep in args.claude else args.claude,
        cors_origins=tuple(args.cors_origins or _env_list(env("CORS_ORIGINS"))),
        allowed_hosts=tuple(h.lower() for h in (args.allowed_hosts or _env_list(env("ALLOWED_HOSTS")))),
        max_concurrency=args.max_concurrency, max_processes=args.max_processes, spares=args.spares,
        conversations=args.conversations, spare_timeout=args.spare_timeout,
        conversation_timeout=args.conversation_timeout, timeout=args.timeout, read_timeout=args.read_timeout,
        max_retries=args.max_retries,
        use_api_key=args.use_api_key, allow_extra_usage=args.allow_extra_usage,
        allow_unauthenticated_remote=args.allow_unauthenticated_remote, log_level=args.log_level)


def _option_parser(env: Callable[[str], Optional[str]]) -> argparse.ArgumentParser:
    """Every option, with its default from the environment, as --help shows it."""
    parser = argparse.ArgumentParser(
        prog="claude_max_proxy.py",
        description="Serve OpenAI's /v1/chat/completions and /v1/responses from your Claude subscription "
                    "through the Claude Code CLI. Every option can also be set with the "
                    "environment variable shown in its help.")
    _access_options(parser.add_argument_group("listening and access").add_argument, env)
    _process_options(parser.add_argument_group("CLI processes").add_argument, env)
    _request_options(parser.add_argument_group("requests and billing").add_argument, env)
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=(env("LOG_LEVEL") or Config.log_level).lower(),
                        help="log verbosity on stderr ($CLAUDE_MAX_PROXY_LOG_LEVEL; default %(default)s)")
    parser.add_argument("--version", action="version", version=f"claude-max-proxy {__version__}")
    return parser


def _access_options(add: Callable, env: Callable[[str], Optional[str]]):
    add("--host", default=env("HOST") or Config.host,
        help="address to listen on ($CLAUDE_MAX_PROXY_HOST; default %(default)s)")
    add("--port", type=int, default=env("PORT") or Config.port,
        help="port to listen on ($CLAUDE_MAX_PROXY_PORT; default %(default)s)")
    add("--claude", metavar="PATH", default=env("CLAUDE") or Config.claude,
        help="the Claude Code CLI to run ($CLAUDE_MAX_PROXY_CLAUDE; default: `claude` on PATH)")
    add("--api-key", metavar="KEY", default=env("API_KEY"),
        help="require `Authorization: Bearer KEY` (or `x-api-key: KEY`) on every route but /health and the status page "
             "($CLAUDE_MAX_PROXY_API_KEY)")
    add("--cors-origin", metavar="ORIGIN", action="append", dest="cors_origins",
        help="allow browser requests from ORIGIN; repeatable, `*` for any "
             "($CLAUDE_MAX_PROXY_CORS_ORIGINS, comma-separated; default: none)")
    add("--allowed-host", metavar="NAME", action="append", dest="allowed_hosts",
        help="accept this Host name too while bound to loopback; repeatable "
             "($CLAUDE_MAX_PROXY_ALLOWED_HOSTS, comma-separated; default: loopback names only)")
    add("--allow-unauthenticated-remote", action="store_true",
        default=_env_flag(env("ALLOW_UNAUTHENTICATED_REMOTE")),
        help="allow a non-loopback --host without --api-key ($CLAUDE_MAX_PROXY_ALLOW_UNAUTHENTICATED_REMOTE=1)")


def _process_options(add: Callable, env: Callable[[str], Optional[str]]):
    add("--max-concurrency", metavar="N", type=int,
        default=env("MAX_CONCURRENCY") or Config.max_concurrency,
        help="CLI processes running at once; a few more requests wait briefly, "
             "the rest get 429 ($CLAUDE_MAX_PROXY_MAX_CONCURRENCY; default %(default)s)")
    add("--max-processes", metavar="N", type=int, default=env("MAX_PROCESSES"),
        help="CLI processes alive at once, whatever they do (running, spare, live or held): the memory "
             f"bound, about 160 MB each ($CLAUDE_MAX_PROXY_MAX_PROCESSES; default {Config.max_processes}, "
             "or --max-concurrency if more)")
    add("--spares", metavar="N", type=int, default=env("SPARES") or Config.spares,
        help="CLI processes started ahead of need, for new conversations; 0 starts each one on demand "
             "($CLAUDE_MAX_PROXY_SPARES; default %(default)s)")
    add("--conversations", metavar="N", type=int, default=env("CONVERSATIONS") or Config.conversations,
        help="finished conversations whose CLI is kept for their next request; 0 replays every "
             "conversation into a new CLI ($CLAUDE_MAX_PROXY_CONVERSATIONS; default %(default)s)")
    add("--spare-timeout", metavar="SECONDS", type=float, default=env("SPARE_TIMEOUT") or Config.spare_timeout,
        help="stop a spare CLI when no new conversation came for this long "
             "($CLAUDE_MAX_PROXY_SPARE_TIMEOUT; default %(default)s)")
    add("--conversation-timeout", metavar="SECONDS", type=float,
        default=env("CONVERSATION_TIMEOUT") or Config.conversation_timeout,
        help="end a kept conversation's CLI after this long without its next request, also one that "
             "waits for tool results ($CLAUDE_MAX_PROXY_CONVERSATION_TIMEOUT; default %(default)s)")


def _request_options(add: Callable, env: Callable[[str], Optional[str]]):
    add("--timeout", metavar="SECONDS", type=float, default=env("TIMEOUT") or Config.timeout,
        help="give up on a request after this long, with 504, also on a client that stops reading its "
             "answer ($CLAUDE_MAX_PROXY_TIMEOUT; default %(default)s)")
    add("--read-timeout", metavar="SECONDS", type=float, default=env("READ_TIMEOUT") or Config.read_timeout,
        help="time a client has to send a request's headers, and then its body, with 408 after it "
             "($CLAUDE_MAX_PROXY_READ_TIMEOUT; default %(default)s)")
    add("--max-retries", metavar="N", type=int, default=env("MAX_RETRIES") or Config.max_retries,
        help="retries the CLI makes on upstream errors ($CLAUDE_MAX_PROXY_MAX_RETRIES; default %(default)s)")
    add("--use-api-key", action="store_true", default=_env_flag(env("USE_API_KEY")),
        help="let the CLI see ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN, which bills the API "
             "per token instead of your subscription ($CLAUDE_MAX_PROXY_USE_API_KEY=1)")
    add("--allow-extra-usage", action="store_true", default=_env_flag(env("ALLOW_EXTRA_USAGE")),
        help="go on answering while Anthropic bills requests to your account's extra usage; without it, "
             "requests are refused until the window resets ($CLAUDE_MAX_PROXY_ALLOW_EXTRA_USAGE=1)")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ── 2. Errors: one exception type, in OpenAI's envelope or Anthropic's ──────

ANTHROPIC_ERROR_TYPES = {401: "authentication_error", 402: "billing_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
ANTHROPIC_ERROR_CODES = {"claude_not_logged_in": "authentication_error"}  # where the status says less


class ApiError(Exception):
    """An error the client sees, as {"error": {"message", "type", "param", "code"}} (OpenAI's envelope),
    or in Anthropic's on the Messages API."""

    def __init__(self, status: int, message: str, *, code: Optional[str] = None,
                 param: Optional[str] = None, error_type: Optional[str] = None,
                 retry_after: Optional[int] = None, headers: Sequence[Tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or (
            "authentication_error" if status == 401 else "rate_limit_error" if status == 429
            else "server_error" if status >= 500 else "invalid_request_error")
        self.headers = [*headers, *([("Retry-After", str(retry_after))] if retry_after else [])]

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """The error as the Messages API gives it: Anthropic's type for the status, and the message."""
        kind = ANTHROPIC_ERROR_CODES.get(self.code or "") or ANTHROPIC_ERROR_TYPES.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


class ClientGone(Exception):
    """The client closed its connection; stop working for it."""


# ── 3. Models: the client's model name → the CLI's --model ──────────────────

# Each family id means the newest model of that family, as in claude-max-api-proxy.
FAMILY_MODELS = {"claude-opus-4": "opus", "claude-sonnet-4": "sonnet", "claude-haiku-4": "haiku"}
ALIASES = ("opus", "sonnet", "haiku")
LISTED_MODELS = (*FAMILY_MODELS, *ALIASES)
FULL_MODEL_ID = re.compile(r"claude-[a-z0-9][a-z0-9.\-]*(\[1m\])?")
MODELS_CREATED = 1735689600  # a fixed date: the CLI does not tell when a model was released


def resolve_model(requested: str) -> str:
    """Return the CLI's --model value for a client's model name, or raise a 404."""
    name = requested.rsplit("/", 1)[-1].strip().lower()  # "openai/claude-opus-4" → "claude-opus-4"
    if name in FAMILY_MODELS:
        return FAMILY_MODELS[name]
    if name in ALIASES or FULL_MODEL_ID.fullmatch(name):
        return name
    raise ApiError(404, f"The model '{requested}' does not exist. Use one of "
                        f"{', '.join(LISTED_MODELS)}, or any full claude-* model id.",
                   code="model_not_found", param="model")


def model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": MODELS_CREATED, "owned_by": "anthropic"}


# ── 4. The OpenAI request: JSON body → ChatRequest (pure) ───────────────────

# Accepted and ignored, because the CLI cannot send them upstream (PROTOCOL.md
# §6.1) or they only mean something to OpenAI: temperature (range-checked),
# top_p, seed, user, metadata, store, prompt_cache_key, frequency_penalty,
# presence_penalty, logit_bias, service_tier, a tool's `strict`, and any field
# we do not know.

EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
           "xhigh": "xhigh", "max": "max"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)
MAX_STOP_SEQUENCES = 64
MAX_STOP_LENGTH = 1000
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule; Claude's is no looser
NOT_IN_TOOL_USE_IDS = re.compile(r"[^A-Za-z0-9_-]")  # Claude's tool_use ids have only the others
NO_PARAMETERS = {"type": "object", "properties": {}}
JSON_OBJECT_SCHEMA = {"type": "object"}
STRUCTURED_OUTPUT_TOOL = "StructuredOutput"  # the CLI's own tool for a response_format (PROTOCOL.md §6.4)
# Deeper JSON is refused on the way in: the parser takes about a thousand
# levels, but copying, comparing and writing a body for the CLI recurse too,
# and must never meet a limit the parser let through.
MAX_NESTING = 100


@dataclass(frozen=True)
class FunctionTool:
    """A client function, as Claude is shown it."""
    name: str
    description: str
    parameters: dict  # the JSON schema of its arguments, always an object schema


@dataclass(frozen=True)
class LaunchSettings:
    """What a CLI process is started with, in its argv and environment: fixed for its life."""
    model: str
    effort: Optional[str] = None      # --effort; None leaves the CLI's default
    max_tokens: Optional[int] = None  # CLAUDE_CODE_MAX_OUTPUT_TOKENS
    thinking: bool = True             # False: CLAUDE_CODE_DISABLE_THINKING=1


@dataclass(frozen=True)
class SessionSettings:
    """What a request gives a started CLI on stdin, in its initialize request."""
    system_prompt: str = ""
    tools: Tuple[FunctionTool, ...] = ()  # offered to Claude; the CLI never runs them
    output_schema: Optional[dict] = None  # Claude answers through the CLI's StructuredOutput tool


def digest(settings: object) -> str:
    """A key for settings: the dataclasses hold dicts (schemas), so they cannot be hashed."""
    return hashlib.blake2b(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Turn:
    role: str      # "user" or "assistant"
    content: list  # Anthropic content blocks


@dataclass(frozen=True)
class ChatRequest:
    model: str                 # as the client named it; echoed in every response
    launch: LaunchSettings
    session: SessionSettings
    history: Tuple[Turn, ...]  # earlier turns, oldest first
    prompt: Turn               # the final user turn, the one Claude answers
    stream: bool = False
    include_usage: bool = False
    stop: Tuple[str, ...] = ()
    one_tool_call: bool = False     # parallel_tool_calls=false, or legacy functions
    legacy_functions: bool = False  # answer with message.function_call, as asked

    @property
    def fresh_launch(self) -> LaunchSettings:
        """The launch settings for a CLI that takes in this conversation afresh.

        Claude requires the thinking that preceded a tool call to come back
        with its result, and OpenAI clients do not keep it: a CLI that did not
        see that thinking answers a turn of tool results without thinking
        rather than fail.
        """
        if any(block["type"] == "tool_result" for block in self.prompt.content):
            return replace(self.launch, thinking=False)
        return self.launch


def check_nesting(value: object, where: str = "") -> None:
    """Refuse JSON that nests deeper than MAX_NESTING, naming where: checked without recursing."""
    containers = [(value, where, 0)] if isinstance(value, (dict, list)) else []
    while containers:
        item, path, depth = containers.pop()
        if depth > MAX_NESTING:
            shown = path if len(path) <= 120 else path[:60] + "…" + path[-60:]
            raise ApiError(400, f"'{shown}' nests deeper than {MAX_NESTING} levels.", param=shown or None,
                           code="nested_too_deeply")
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(child, (dict, list)):
                name = f"{path}[{key}]" if isinstance(item, list) else f"{path}.{key}" if path else str(key)
                containers.append((child, name, depth + 1))


def requested_model(body: object) -> str:
    """The model a request body names, once the body is known to be an object."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "'model' is required: name a model such as claude-sonnet-4.", param="model")
    return model


def parse_chat_request(body: object) -> ChatRequest:
    model = requested_model(body)
    cli_model = resolve_model(model)
    system_prompt, turns = parse_messages(body.get("messages"))
    stream = _optional(body, "stream", (bool,), False)
    stream_options = _optional(body, "stream_options", (dict,), {}) or {}
    include_usage = _optional(stream_options, "include_usage", (bool,), False,
                              param="stream_options.include_usage")
    if _optional(body, "n", (int,), 1) != 1:
        raise ApiError(400, "Only n=1 is supported: Claude Code returns one choice per request.", param="n")
    if _optional(body, "logprobs", (bool,), False) or body.get("top_logprobs") is not None:
        raise ApiError(400, "logprobs are not available through Claude Code.", param="logprobs")
    temperature = _optional(body, "temperature", (float, int), None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2, got {temperature}.", param="temperature")
    tools, tool_instruction, legacy = parse_tools(body)
    output_schema = _structured_output(_output_schema(body), tools, "response_format")
    history, prompt = tuple(turns[:-1]), turns[-1]
    launch = LaunchSettings(model=cli_model, max_tokens=_max_tokens(body), **_effort(body))
    session = SessionSettings(system_prompt="\n\n".join(p for p in (system_prompt, tool_instruction) if p),
                              tools=tools, output_schema=output_schema)
    parallel = _optional(body, "parallel_tool_calls", (bool,), True)
    return ChatRequest(model=model, launch=launch, session=session, history=history, prompt=prompt,
                       stream=stream, include_usage=include_usage,
                       stop=_stop_sequences(body.get("stop")),
                       one_tool_call=legacy or not parallel, legacy_functions=legacy)


def _optional(body: dict, name: str, kinds: tuple, default, param: Optional[str] = None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        kind = {bool: "boolean", int: "integer", dict: "object", str: "string",
                list: "array"}.get(kinds[0], "number")
        param = param or name
        raise ApiError(400, f"'{param}' must be a {kind}, got {json.dumps(value)[:40]}.", param=param)
    return value


def _max_tokens(body: dict) -> Optional[int]:
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins, as at OpenAI
        value = _optional(body, name, (int,), None)
        if value is not None:
            if value < 1:
                raise ApiError(400, f"'{name}' must be at least 1, got {value}.", param=name)
            return value
    return None


def _effort(body: dict) -> dict:
    effort = _optional(body, "reasoning_effort", (str,), None)
    if effort is None:
        return {}
    if effort == "none":
        return {"thinking": False}
    if effort not in EFFORTS:
        raise ApiError(400, f"'reasoning_effort' must be one of none, {', '.join(EFFORTS)}; "
                            f"got '{effort}'.", param="reasoning_effort")
    return {"effort": EFFORTS[effort]}


def _stop_sequences(stop: object) -> Tuple[str, ...]:
    if stop is None:
        return ()
    # More than OpenAI's four: the proxy cuts the text itself, and Continue sends more. Each one
    # costs a little on every delta, so not without end.
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} non-empty "
                            f"strings of up to {MAX_STOP_LENGTH} characters.", param="stop")
    return tuple(dict.fromkeys(stops))


def parse_tools(body: dict) -> Tuple[Tuple[FunctionTool, ...], str, bool]:
    """The tools Claude is offered, an instruction for tool_choice, and whether they came as legacy functions.

    The CLI sends Claude no tool_choice, so "required" and a named function
    become an instruction in the system prompt (a named function is also the
    only one offered); "none" offers nothing.
    """
    legacy = body.get("tools") is None and body.get("functions") is not None
    if legacy:
        specs = _optional(body, "functions", (list,), [])
        tools = [_function_tool(spec, f"functions[{i}]") for i, spec in enumerate(specs)]
        choice, choice_param = body.get("function_call"), "function_call"
        if isinstance(choice, dict):  # the legacy {"name": ...}
            choice = {"type": "function", "function": choice}
    else:
        specs = _optional(body, "tools", (list,), [])
        tools = [_tool(spec, f"tools[{i}]") for i, spec in enumerate(specs)]
        choice, choice_param = body.get("tool_choice"), "tool_choice"
    tools, instruction = offered_tools(tools, *_tool_choice(choice, choice_param), choice_param)
    return tools, instruction, legacy


def offered_tools(tools: Sequence[FunctionTool], mode: str, allowed: Optional[List[str]],
                  choice_param: str) -> Tuple[Tuple[FunctionTool, ...], str]:
    """The tools a tool choice ("auto", "none" or "required", and the names it allows) offers,
    and the instruction it makes."""
    names = [tool.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ApiError(400, f"Tool names must be unique; {', '.join(duplicates)} is given twice.", param="tools")
    if mode == "none":
        return (), ""
    if allowed is not None:
        unknown = [name for name in allowed if name not in names]
        if unknown:
            raise ApiError(400, f"'{choice_param}' names {', '.join(unknown)}, which is not among the "
                                "tools given.", param=choice_param)
        tools = [tool for tool in tools if tool.name in allowed]
    if mode == "required" and not tools:
        raise ApiError(400, f"'{choice_param}' requires a tool call, but no tools are given.",
                       param=choice_param)
    instruction = ""
    if mode == "required" and allowed is not None and len(allowed) == 1:
        instruction = f"Respond by calling the function `{allowed[0]}`."
    elif mode == "required":
        instruction = "Respond by calling one or more of the available functions, not with text alone."
    return tuple(tools), instruction


def _tool_choice(choice: object, param: str) -> Tuple[str, Optional[List[str]]]:
    """("auto" | "none" | "required", the names it allows or None for all)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto", None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return "required", [choice["function"]["name"]]
    if kind == "allowed_tools" and isinstance(choice.get("allowed_tools"), dict):
        allowed = choice["allowed_tools"]
        tools = allowed.get("tools") if isinstance(allowed.get("tools"), list) else []
        functions = [tool.get("function") if isinstance(tool, dict) else None for tool in tools]
        names = [function.get("name") if isinstance(function, dict) else None for function in functions]
        if allowed.get("mode", "auto") in ("auto", "required") and names and all(isinstance(n, str) for n in names):
            return allowed.get("mode", "auto"), names
    raise ApiError(400, f"'{param}' must be \"auto\", \"none\", \"required\", "
                        '{"type": "function", "function": {"name": ...}} or an allowed_tools choice.',
                   param=param)


def _tool(spec: object, where: str) -> FunctionTool:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind != "function" or not isinstance(spec.get("function"), dict):
        raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}; "
                            f"Claude Code cannot run {kind or 'untyped'} tools.", param=where)
    return _function_tool(spec["function"], f"{where}.function")


def _function_tool(spec: object, where: str) -> FunctionTool:
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise ApiError(400, f"{where}.name must be 1 to 64 letters, digits, underscores or dashes; "
                            f"got {json.dumps(name)[:80]}.", param=f"{where}.name")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise ApiError(400, f"{where}.description must be a string.", param=f"{where}.description")
    return FunctionTool(name, description, _object_schema(spec.get("parameters"), f"{where}.parameters"))


def _object_schema(schema: object, where: str) -> dict:
    """An arguments schema Claude Code will publish: one bad schema makes it drop every tool."""
    if schema is None or schema == {}:
        return dict(NO_PARAMETERS)
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise ApiError(400, f"{where} must be a JSON schema of type \"object\".", param=where)
    if not isinstance(schema.get("properties", {}), dict):
        raise ApiError(400, f"{where}.properties must be an object.", param=f"{where}.properties")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise ApiError(400, f"{where}.required must be an array of property names.", param=f"{where}.required")
    return {"type": "object", **schema}


def _structured_output(schema: Optional[dict], tools: Sequence[FunctionTool], param: str) -> Optional[dict]:
    """The schema the answer must follow, if no tool of the client's has the name Claude Code answers it with."""
    if schema is not None and any(tool.name == STRUCTURED_OUTPUT_TOOL for tool in tools):
        raise ApiError(400, f"A tool named {STRUCTURED_OUTPUT_TOOL} cannot be used with '{param}': Claude Code "
                            "answers with a schema through its own tool of that name.", param="tools")
    return schema


def _output_schema(body: dict) -> Optional[dict]:
    response_format = _optional(body, "response_format", (dict,), None)
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object.",
                           param="response_format.json_schema.schema")
        return _object_schema(spec["schema"], "response_format.json_schema.schema")
    raise ApiError(400, f"'response_format.type' must be text, json_object or json_schema; got "
                        f"{json.dumps(kind)[:40]}.", param="response_format.type")


def parse_messages(messages: object) -> Tuple[str, List[Turn]]:
    """Split OpenAI messages into a system prompt and alternating Anthropic turns.

    Tool calls and their results are paired by the ids this request carries
    (clients such as OpenClaw rewrite ids, so none is remembered between
    requests), and every call must be answered before the conversation goes
    on, as OpenAI requires and Claude does too.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages.", param="messages")
    system_parts: List[str] = []
    turns: List[Turn] = []
    calls = OpenToolCalls()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a 'role'.", param=where)
        role = message["role"]
        if role in ("system", "developer"):
            system_parts.append(_plain_text(message.get("content"), where))
            continue
        if role in ("tool", "function"):
            turn = Turn("user", [_tool_result_block(message, where, calls)])
        elif role not in ("user", "assistant"):
            raise ApiError(400, f"{where} has an unknown role '{role}'; use system, developer, "
                                "user, assistant or tool.", param=f"{where}.role")
        else:
            calls.check_answered(before=where)
            if role == "user":
                turn = Turn("user", _user_blocks(message.get("content"), where))
            else:
                turn = Turn("assistant", _assistant_blocks(message, where, calls))
        if not turn.content:
            continue  # an empty message carries nothing, and Claude rejects empty text
        if turns and turns[-1].role == turn.role:  # Claude wants roles to alternate
            turn = Turn(turn.role, turns.pop().content + turn.content)
        turns.append(turn)
    calls.check_answered(before="the end of 'messages'")
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "The last message must be a user (or tool) message with content: "
                            "Claude answers the user's turn.", param="messages")
    # Claude needs tool results first in a user turn that also has text.
    turns = [Turn(t.role, sorted(t.content, key=lambda b: b["type"] != "tool_result")) for t in turns]
    return "\n\n".join(part for part in system_parts if part), turns


def _plain_text(content: object, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind not in ("text", "input_text", "refusal"):
                raise ApiError(400, f"{where}.content[{i}] has type '{kind}'; only text parts "
                                    "are allowed here.", param=f"{where}.content[{i}]")
            texts.append(_part_text(part, "refusal" if kind == "refusal" else "text", f"{where}.content[{i}]"))
        return "\n".join(texts)
    raise ApiError(400, f"{where}.content must be a string or an array of content parts.",
                   param=f"{where}.content")


def _part_text(part: dict, key: str, where: str) -> str:
    if not isinstance(part.get(key), str):
        raise ApiError(400, f"{where}.{key} must be a string.", param=f"{where}.{key}")
    return part[key]


def _user_blocks(content: object, where: str) -> list:
    if not isinstance(content, list):
        text = _plain_text(content, where)
        return [{"type": "text", "text": text}] if text else []
    blocks = []
    for i, part in enumerate(content):
        here = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            text = _part_text(part, "text", here)
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url"), here))
        else:
            shown = kind if kind is not None else json.dumps(part)[:40]
            raise ApiError(400, f"{here} has type '{shown}', which cannot be sent to Claude; "
                                "use 'text' or 'image_url' parts.", param=here)
    return blocks


def _image_block(image_url: object, where: str) -> dict:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise ApiError(400, f"{where}.image_url.url must be a string.", param=f"{where}.image_url")
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    match = DATA_URL.fullmatch(url.strip())
    if not match:
        raise ApiError(400, f"{where}.image_url.url must be an http(s) URL or a base64 data URL "
                            "(data:image/png;base64,...).", param=f"{where}.image_url")
    return _base64_image(match["type"], match["data"], where, f"{where}.image_url", "url")


def _base64_image(media_type: str, data: str, where: str, param: str, data_field: str) -> dict:
    media_type, data = media_type.lower(), re.sub(r"\s+", "", data)
    media_type = "image/jpeg" if media_type == "image/jpg" else media_type
    if media_type not in IMAGE_TYPES:
        raise ApiError(400, f"{where} is a {media_type} image; Claude accepts "
                            f"{', '.join(IMAGE_TYPES)}.", param=param)
    try:
        if not base64.b64decode(data, validate=True):
            raise binascii.Error("no data")
    except binascii.Error:
        raise ApiError(400, f"{param}.{data_field} has no valid base64 data.", param=param) from None
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_blocks(message: dict, where: str, calls: "OpenToolCalls") -> list:
    text = _plain_text(message.get("content"), where)
    blocks = [{"type": "text", "text": text}] if text else []
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise ApiError(400, f"{where}.tool_calls must be an array.", param=f"{where}.tool_calls")
    made = [(f"{where}.tool_calls[{i}]", call) for i, call in enumerate(tool_calls)]
    if message.get("function_call") is not None:  # legacy: one call, answered by a "function" message
        made.append((f"{where}.function_call",
                     {"id": "call_" + where.replace("[", "_").rstrip("]"), "function": message["function_call"]}))
    for here, call in made:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str) or not call["id"] \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, f"{here} must have an 'id' and a 'function' with a 'name'.", param=here)
        arguments = function.get("arguments") or "{}"
        try:
            tool_input = json.loads(arguments) if isinstance(arguments, str) else arguments
        except (ValueError, RecursionError):
            tool_input = None
        if not isinstance(tool_input, dict):
            raise ApiError(400, f"{here}.function.arguments must be a JSON object.",
                           param=f"{here}.function.arguments")
        check_nesting(tool_input, f"{here}.function.arguments")
        blocks.append({"type": "tool_use", "id": calls.add(call["id"], here), "name": function["name"],
                       "input": tool_input})
    return blocks


def _tool_result_block(message: dict, where: str, calls: "OpenToolCalls") -> dict:
    if message["role"] == "function":  # legacy: answers the one open function_call
        tool_use_id = calls.answer_function_call(where)
    else:
        tool_call_id = message.get("tool_call_id")
        if not isinstance(tool_call_id, str) or not tool_call_id:
            raise ApiError(400, f"{where} is a tool message without a 'tool_call_id'.",
                           param=f"{where}.tool_call_id")
        tool_use_id = calls.answer(tool_call_id, where)
    block = {"type": "tool_result", "tool_use_id": tool_use_id}
    content = _plain_text(message.get("content"), where)
    # A list of one text block, as the CLI sends a result its tool server gave:
    # a conversation it continues in place reads the same as one replayed.
    return dict(block, content=[{"type": "text", "text": content}]) if content else block


class OpenToolCalls:
    """Pairs tool calls with their results by the ids this request carries.

    Clients such as OpenClaw rewrite ids, so none is remembered between
    requests. Claude wants ids unique in a conversation and made of letters,
    digits, "_" and "-"; some clients reuse "call_0" every turn, or use other
    characters, so such a call gets a safe, unique id of its own.
    """

    def __init__(self, id_field: str = "tool_call_id", result: str = "tool message"):
        self.waiting: Dict[str, Tuple[str, str]] = {}  # the client's id → (Claude's id, where the call is)
        self.used: set = set()
        self.id_field, self.result = id_field, result  # the API's words, for its errors

    def add(self, given: str, where: str) -> str:
        if given in self.waiting:
            raise ApiError(400, f"{where} has the id '{given}' of another call in the same message.", param=where)
        safe = tool_use_id = NOT_IN_TOOL_USE_IDS.sub("_", given)
        copies = 1
        while tool_use_id in self.used:
            copies += 1
            tool_use_id = f"{safe}_{copies}"
        self.used.add(tool_use_id)
        self.waiting[given] = (tool_use_id, where)
        return tool_use_id

    def answer(self, given: str, where: str) -> str:
        if given not in self.waiting:
            raise ApiError(400, f"{where} answers {self.id_field} '{given}', which no tool call of the "
                                f"assistant message before it has (or another {self.result} answered).",
                           param=f"{where}.{self.id_field}")
        return self.waiting.pop(given)[0]

    def answer_function_call(self, where: str) -> str:
        legacy = [given for given, (_, call_where) in self.waiting.items() if call_where.endswith(".function_call")]
        if not legacy:
            raise ApiError(400, f"{where} is a function message, but no assistant function_call is "
                                "waiting for it.", param=where)
        return self.waiting.pop(legacy[0])[0]

    def check_answered(self, before: str):
        if self.waiting:
            given, (_, where) = next(iter(self.waiting.items()))
            raise ApiError(400, f"{where} (id '{given}') has no {self.result} answering it before {before}.",
                           param=where)


def canonical_turns(turns: Sequence[Turn]) -> Tuple[List[str], Dict[str, str]]:
    """Each turn as text that two tellings of one conversation share, and the
    label each tool-call id got.

    Clients re-serialize JSON and rename tool-call ids (OpenClaw does), so
    the text holds the turns' blocks with sorted keys, and each id is replaced
    by its order of first appearance ("#0", "#1", ...).
    """
    labels: Dict[str, str] = {}

    def label(tool_id: str) -> str:
        return labels.setdefault(tool_id, f"#{len(labels)}")

    texts = []
    for turn in turns:
        blocks = [dict(block, id=label(block["id"])) if block["type"] == "tool_use" else
                  dict(block, tool_use_id=label(block["tool_use_id"])) if block["type"] == "tool_result" else block
                  for block in turn.content]
        texts.append(json.dumps([turn.role, blocks], sort_keys=True))
    return texts, labels


# The Responses API (/v1/responses) is served by the same core: its request
# becomes a Chat Completions body, and parse_chat_request takes it from there.

RESPONSES_FIELDS = {"model": "model", "stream": "stream", "temperature": "temperature", "top_p": "top_p",
                    "parallel_tool_calls": "parallel_tool_calls", "max_output_tokens": "max_completion_tokens"}
# Where a chat field came from, for the chat fields that are not the Responses field's own.
RESPONSES_NAMES = {"max_completion_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort",
                   "response_format.json_schema": "text.format", "response_format": "text.format"}


def parse_responses_request(body: object, earlier: Sequence[dict] = ()) -> Tuple[ChatRequest, List[dict]]:
    """A Responses API request as a ChatRequest, and its input as chat messages.

    Its errors name the Responses field (`input[3]`, `max_output_tokens`),
    not the chat field it was translated to.
    """
    chat, new, names = chat_body_from_responses(body, earlier)
    try:
        return parse_chat_request(chat), new
    except ApiError as err:
        raise renamed(err, names) from None


def renamed(err: ApiError, names: Mapping[str, str]) -> ApiError:
    """The error with each chat field in its param and message replaced by the field it came from."""
    fields = re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r"(?![\w\[])")
    rename = lambda text: fields.sub(lambda found: names[found[0]], text)  # noqa: E731
    message = rename(err.message)
    param = err.param and rename(err.param)
    if err.param == "messages":
        message, param = message.replace("'messages'", "'input'"), "input"
    return ApiError(err.status, message, code=err.code, param=param, error_type=err.error_type,
                    headers=err.headers)


def chat_body_from_responses(body: object, earlier: Sequence[dict] = ()) -> Tuple[dict, List[dict], Dict[str, str]]:
    """A Responses API request as a Chat Completions body, its input as chat
    messages, and the Responses field each chat field came from.

    `earlier` is the conversation a previous_response_id stands for, as chat
    messages. Claude Code cannot run hosted tools (web_search and the like),
    and free-form `custom` tools have no JSON schema: every tool but a function
    is left out, and a namespace's functions are offered one by one.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    chat = {chat_name: body[name] for name, chat_name in RESPONSES_FIELDS.items() if name in body}
    names = dict(RESPONSES_NAMES)
    instructions = _optional(body, "instructions", (str,), "")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    names.update({f"messages[{k}]": "instructions" for k in range(len(messages))})
    names.update({f"messages[{len(messages) + k}]": "previous_response_id" for k in range(len(earlier))})
    new, new_names = input_messages(body.get("input"), first=len(messages) + len(earlier))
    names.update(new_names)
    chat["messages"] = messages + list(earlier) + new
    reasoning = _optional(body, "reasoning", (dict,), {}) or {}
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    text_format = _optional(_optional(body, "text", (dict,), {}) or {}, "format", (dict,), None, param="text.format")
    if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            key: text_format[key] for key in ("name", "schema", "strict", "description") if key in text_format}}
    elif text_format is not None:
        chat["response_format"] = text_format
    functions = _flat_functions(_optional(body, "tools", (list,), []), "tools")
    if functions:
        chat["tools"] = [{"type": "function", "function": function} for _, function, _ in functions]
        names.update({f"tools[{k}].function": where for k, (where, _, _) in enumerate(functions)})
        names.update({f"tools[{k}]": where for k, (where, _, _) in enumerate(functions)})
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    return chat, new, names


def response_echo(body: dict) -> dict:
    """The request's settings, as a response object repeats them."""
    return {"model": body.get("model"), "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "store": body.get("store", True), "temperature": body.get("temperature"),
            "text": body.get("text") or {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "top_p": body.get("top_p"), "truncation": "disabled",
            "metadata": body.get("metadata") or {}}


def _type_of(thing: object) -> Optional[str]:
    """The `type` of a tool, an input item or a content part, if it is an object."""
    return thing.get("type") if isinstance(thing, dict) else None


def _flat_functions(tools: list, where: str,
                    namespace: Optional[str] = None) -> List[Tuple[str, dict, Optional[str]]]:
    """Each function, at any depth of namespaces, as a chat function, with where it was given and its
    namespace."""
    functions = []
    for i, tool in enumerate(tools):
        here = f"{where}[{i}]"
        if _type_of(tool) == "namespace":
            inner = _optional(tool, "tools", (list,), [], param=f"{here}.tools")
            name = _optional(tool, "name", (str,), None, param=f"{here}.name")
            functions += _flat_functions(inner, f"{here}.tools", name)
        elif _type_of(tool) == "function":
            functions.append((here, {key: value for key, value in tool.items() if key != "type"}, namespace))
    return functions


def namespaces_of(tools: list) -> Dict[str, str]:
    """Each function's namespace, for the calls that come back; `tools` as parse_responses_request
    checked them."""
    return {function["name"]: namespace for _, function, namespace in _flat_functions(tools, "tools") if namespace}


def _chat_tool_choice(choice: object) -> object:
    kind = _type_of(choice)
    if kind == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if kind == "allowed_tools":
        return {"type": "allowed_tools", "allowed_tools": {
            "mode": choice.get("mode", "auto"),
            "tools": [{"type": "function", "function": {"name": tool.get("name")}}
                      for tool in choice.get("tools") if isinstance(tool, dict)]
            if isinstance(choice.get("tools"), list) else None}}
    return choice  # "auto", "none", "required"; anything else is refused as a bad tool_choice


def input_messages(items: object, first: int = 0) -> Tuple[List[dict], Dict[str, str]]:
    """Responses `input` (a string, or items) as chat messages, and the item
    each chat field came from, for messages numbered from `first`."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}], {f"messages[{first}]": "input"}
    if not isinstance(items, list):
        raise ApiError(400, "'input' must be a string or an array of input items.", param="input")
    messages: List[dict] = []
    names: Dict[str, str] = {}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = _type_of(item) or ("message" if isinstance(item, dict) and "role" in item else None)
        here = f"messages[{first + len(messages)}]"
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _message_content(item.get("content"), where)})
            names[here] = where
        elif kind == "function_call":
            if not all(isinstance(item.get(key), str) for key in ("call_id", "name", "arguments")):
                raise ApiError(400, f"{where} must have a 'call_id', a 'name' and 'arguments' (a JSON string).",
                               param=where)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":  # one assistant turn, however many calls
                here = f"messages[{first + len(messages) - 1}]"
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                names[here] = where
            call_at = f"{here}.tool_calls[{len(messages[-1]['tool_calls']) - 1}]"
            names.update({call_at: where, f"{call_at}.function": where})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _message_content(item.get("output"), where)})
            names.update({here: where, f"{here}.tool_call_id": f"{where}.call_id", f"{here}.content": f"{where}.output"})
        elif kind != "reasoning":  # Claude's thinking is not sent back; Codex echoes it
            raise ApiError(400, f"{where} has type '{kind}'; use message, function_call or "
                                "function_call_output items.", param=where)
    return messages, names


def _message_content(content: object, where: str) -> object:
    if not isinstance(content, list):
        return content
    parts = []
    for i, part in enumerate(content):
        kind = _type_of(part)
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": part.get("text", part.get("refusal"))})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise ApiError(400, f"{where}.content[{i}] has type '{kind}'; use input_text or input_image "
                                "(with an image_url) parts.", param=f"{where}.content[{i}]")
    return parts


# The Messages API (/v1/messages) is Anthropic's own: its blocks already are
# the ones Claude takes, so they are checked and kept, not translated.

THINKING_BLOCKS = ("thinking", "redacted_thinking")
MESSAGES_TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}


@dataclass(frozen=True)
class MessagesRequest:
    chat: ChatRequest
    shows_thinking: bool  # the client asked for thinking, and so gets thinking blocks


def parse_messages_request(body: object) -> MessagesRequest:
    model = requested_model(body)
    max_tokens = _optional(body, "max_tokens", (int,), None)
    if max_tokens is None or max_tokens < 1:
        raise ApiError(400, "'max_tokens' is required, and must be at least 1.", param="max_tokens")
    for name, top in (("temperature", 1), ("top_p", 1)):
        value = _optional(body, name, (float, int), None)
        if value is not None and not 0 <= value <= top:
            raise ApiError(400, f"'{name}' must be between 0 and {top}, got {value}.", param=name)
    _optional(body, "top_k", (int,), None)
    _optional(body, "metadata", (dict,), None)
    thinking = _optional(body, "thinking", (dict,), {})
    kind = _thinking_kind(thinking, max_tokens)
    history, prompt = _messages_turns(body.get("messages"))
    tools, instruction, one_tool_call = _messages_tools(body)
    choice = (body.get("tool_choice") or {}).get("type")
    if kind in ("enabled", "adaptive") and choice in ("any", "tool"):
        raise ApiError(400, "Thinking may not be enabled when 'tool_choice' forces tool use.", param="tool_choice")
    output_schema, effort = _messages_output(body, tools)
    system = "\n\n".join(part for part in (_system_text(body.get("system")), instruction) if part)
    launch = LaunchSettings(model=resolve_model(model), effort=effort, max_tokens=max_tokens,
                            thinking=kind != "disabled")
    try:
        stops = _stop_sequences(body.get("stop_sequences"))
    except ApiError as err:
        raise renamed(err, {"stop": "stop_sequences"}) from None
    session = SessionSettings(system_prompt=system, tools=tools, output_schema=output_schema)
    chat = ChatRequest(model=model, launch=launch, session=session, history=history, prompt=prompt,
                       stream=_optional(body, "stream", (bool,), False), stop=stops, one_tool_call=one_tool_call)
    shown = kind in ("enabled", "adaptive") and thinking.get("display") != "omitted"
    return MessagesRequest(chat, shows_thinking=shown)


def _thinking_kind(thinking: dict, max_tokens: int) -> str:
    """"enabled", "adaptive", "disabled", or "" when the client did not say."""
    if not thinking:
        return ""
    kind = thinking.get("type")
    if kind not in ("enabled", "adaptive", "disabled"):
        raise ApiError(400, "'thinking.type' must be enabled, adaptive or disabled.", param="thinking.type")
    if kind == "enabled":
        budget = _optional(thinking, "budget_tokens", (int,), None, param="thinking.budget_tokens")
        if budget is None or budget < 1024:
            raise ApiError(400, "'thinking.budget_tokens' must be at least 1024.", param="thinking.budget_tokens")
        if budget >= max_tokens:
            raise ApiError(400, "'max_tokens' must be greater than 'thinking.budget_tokens'.", param="max_tokens")
    return kind


def _messages_output(body: dict, tools: Sequence[FunctionTool]) -> Tuple[Optional[dict], Optional[str]]:
    """The schema of output_config.format (or the older output_format), and output_config.effort."""
    output_config = _optional(body, "output_config", (dict,), {})
    effort = _optional(output_config, "effort", (str,), None, param="output_config.effort")
    if effort is not None and effort not in EFFORTS.values():
        raise ApiError(400, f"'output_config.effort' must be one of {', '.join(sorted(set(EFFORTS.values())))}; "
                            f"got '{effort}'.", param="output_config.effort")
    for param, spec in (("output_config.format", output_config.get("format")),
                        ("output_format", body.get("output_format"))):
        if spec is None:
            continue
        if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, f"'{param}' must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}.", param=param)
        return _structured_output(_object_schema(spec["schema"], f"{param}.schema"), tools, param), effort
    return None, effort


def _system_text(system: object) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if isinstance(system, list):
        return "\n\n".join(_text_of(block, f"system[{i}]") for i, block in enumerate(system))
    raise ApiError(400, "'system' must be a string or an array of text blocks.", param="system")


def _text_of(block: object, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise ApiError(400, f"{where} must be a text block: {{\"type\": \"text\", \"text\": ...}}.", param=where)
    return block["text"]


def _messages_turns(messages: object) -> Tuple[Tuple[Turn, ...], Turn]:
    """The messages as alternating turns, and the last user turn apart; every tool_use answered
    by a tool_result in the user turn after it, as at Anthropic."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages.", param="messages")
    turns: List[Turn] = []
    calls = OpenToolCalls(id_field="tool_use_id", result="tool_result")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where} must be an object with the role user or assistant.", param=where)
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or an array of content blocks.",
                           param=f"{where}.content")
        if role == "assistant":
            calls.check_answered(before=where)
        blocks = [_message_block(role, block, f"{where}.content[{i}]", calls) for i, block in enumerate(content)]
        turn = Turn(role, [block for block in blocks if block is not None])
        if not turn.content:
            continue
        if turns and turns[-1].role == role:
            turn = Turn(role, turns.pop().content + turn.content)
        turns.append(turn)
    calls.check_answered(before="the end of 'messages'")
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "The last message must be a user message with content: Claude Code answers the "
                            "user's turn, and cannot go on with a prefilled assistant turn.", param="messages")
    turns = [Turn(t.role, sorted(t.content, key=lambda b: b["type"] != "tool_result")) for t in turns]
    return tuple(turns[:-1]), turns[-1]


def _message_block(role: str, block: object, where: str, calls: OpenToolCalls) -> Optional[dict]:
    """The block as Claude takes it (None: nothing to send), with only the fields Claude Code passes on."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        text = _text_of(block, where)
        return {"type": "text", "text": text} if text else None
    if role == "user" and kind == "image":
        return _source_image(block.get("source"), where)
    if role == "user" and kind == "tool_result":
        return _tool_result(block, where, calls)
    if role == "assistant" and kind == "tool_use":
        name, tool_input = block.get("name"), block.get("input")
        if not isinstance(block.get("id"), str) or not block["id"] or not isinstance(name, str) or not name \
                or not isinstance(tool_input, dict):
            raise ApiError(400, f"{where} must have an 'id', a 'name' and an 'input' object.", param=where)
        return {"type": "tool_use", "id": calls.add(block["id"], where), "name": name, "input": tool_input}
    if role == "assistant" and kind in THINKING_BLOCKS:
        return None  # the CLI keeps its own; one that takes in the conversation anew answers without
    shown = kind if isinstance(kind, str) else json.dumps(block)[:40]
    allowed = "text, image and tool_result" if role == "user" else "text, tool_use and thinking"
    raise ApiError(400, f"{where} has type '{shown}', which Claude Code cannot take in a {role} message; "
                        f"use {allowed} blocks.", param=where)


def _source_image(source: object, where: str) -> dict:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "url" and isinstance(source.get("url"), str) and source["url"].startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": source["url"]}}
    if kind == "base64" and isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str):
        return _base64_image(source["media_type"], source["data"], where, f"{where}.source", "data")
    raise ApiError(400, f"{where}.source must be {{\"type\": \"base64\", \"media_type\", \"data\"}} or "
                        "{\"type\": \"url\", \"url\": \"https://...\"}.", param=f"{where}.source")


def _tool_result(block: dict, where: str, calls: OpenToolCalls) -> dict:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise ApiError(400, f"{where} is a tool_result without a 'tool_use_id'.", param=f"{where}.tool_use_id")
    result = {"type": "tool_result", "tool_use_id": calls.answer(tool_use_id, where)}
    content = block.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}] if content else []
    if content is not None and not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or an array of text and image blocks.",
                       param=f"{where}.content")
    parts = []
    for i, part in enumerate(content or []):
        here = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append(_source_image(part.get("source"), here))
        elif kind not in ("text", None):
            raise ApiError(400, f"{here} has type '{str(kind)[:40]}'; a tool_result takes text and image "
                                "blocks through Claude Code.", param=here)
        elif _text_of(part, here):
            parts.append({"type": "text", "text": part["text"]})
    if parts:
        result["content"] = parts
    if _optional(block, "is_error", (bool,), False, param=f"{where}.is_error"):
        result["is_error"] = True
    return result


def _messages_tools(body: dict) -> Tuple[Tuple[FunctionTool, ...], str, bool]:
    """The tools Claude is offered, the instruction their tool_choice makes, and whether one call at most."""
    specs = _optional(body, "tools", (list,), [])
    tools = []
    for i, spec in enumerate(specs):
        where = f"tools[{i}]"
        kind = spec.get("type", "custom") if isinstance(spec, dict) else None
        if kind != "custom":
            raise ApiError(400, f"{where} has type '{kind}', one of Anthropic's own tools, whose definition Claude "
                                "Code cannot pass on: give it as a tool with a 'name' and an 'input_schema'.",
                           param=where)
        try:
            tools.append(_function_tool({"name": spec.get("name"), "description": spec.get("description"),
                                         "parameters": spec.get("input_schema")}, where))
        except ApiError as err:
            raise renamed(err, {f"{where}.parameters": f"{where}.input_schema"}) from None
    choice = _optional(body, "tool_choice", (dict,), {"type": "auto"})
    mode = MESSAGES_TOOL_CHOICES.get(choice.get("type"))
    if mode is None or choice.get("type") == "tool" and not isinstance(choice.get("name"), str):
        raise ApiError(400, "'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} "
                            "or {\"type\": \"tool\", \"name\": ...}.", param="tool_choice")
    one_call = _optional(choice, "disable_parallel_tool_use", (bool,), False,
                         param="tool_choice.disable_parallel_tool_use")
    allowed = [choice["name"]] if choice.get("type") == "tool" else None
    offered, instruction = offered_tools(tools, mode, allowed, "tool_choice")
    return offered, instruction, one_call


# ── 5. The CLI process: LaunchSettings → a running `claude -p` (I/O) ────────

# Built-in tools off, nothing read from settings or CLAUDE.md, nothing saved.
# Every flag uses the --flag=value form: variadic flags swallow what follows.
CLI_FLAGS = ("-p", "--input-format=stream-json", "--output-format=stream-json", "--verbose",
             "--include-partial-messages", "--tools=", "--setting-sources=", "--strict-mcp-config",
             "--disable-slash-commands", "--no-session-persistence")
BILLING_VARIABLES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
EXIT_GRACE_SECONDS = 2.0
POLL_SECONDS = 0.25                # how often a running turn checks its client
# After each read of the CLI's output, the reader waits this long for more: a
# stream of deltas then costs the proxy a wake-up every two milliseconds, not
# one per delta, which on a laptop's two cores took a third of the CLI's own
# CPU; at one a millisecond, a 3,000-word answer took the proxy a third more
# CPU. No token waits in the proxy longer than this.
READ_PAUSE_SECONDS = 0.002
# The client's functions reach Claude as tools of an MCP server that lives in
# this process and speaks over the control channel (PROTOCOL.md §8.3). The CLI
# asks us before any of them runs (§8.4): we refuse, or run it with the result
# the client sent. Every CLI gets the server, so a spare can take a request
# with or without tools: with none, what reaches Claude is byte for byte the
# same as without the server. A CLI asks for the tool list at its start and
# waits for it before it runs a turn; we answer once a request has given it
# its session.
TOOL_SERVER = "client"
# Up to this many characters, the CLI passes a tool result to Claude whole
# (more is saved to a file and Claude is shown the start), if the tool says so.
MAX_RESULT_CHARS = 500_000
TOOL_FLAGS = ("--mcp-config=" + json.dumps({"mcpServers": {TOOL_SERVER: {"type": "sdk", "name": TOOL_SERVER}}}),
              "--permission-prompt-tool=stdio")


def build_cli_argv(claude: str, settings: LaunchSettings) -> List[str]:
    argv = [claude, *CLI_FLAGS, *TOOL_FLAGS, f"--model={settings.model}"]
    if settings.effort:
        argv.append(f"--effort={settings.effort}")
    return argv


def build_cli_env(environ: Mapping[str, str], config: Config, settings: LaunchSettings) -> dict:
    env = {k: v for k, v in environ.items() if config.use_api_key or k not in BILLING_VARIABLES}
    env["CLAUDE_CODE_MAX_RETRIES"] = str(config.max_retries)
    env["CLAUDE_AGENT_SDK_MCP_NO_PREFIX"] = "1"  # Claude sees get_weather, not mcp__client__get_weather
    env.setdefault("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")  # no telemetry; starts faster
    # The client keeps its own budget: no "<total_tokens>N tokens left" note after its tool results.
    env["CLAUDE_CODE_TOTAL_TOKENS_REMINDER"] = "off"
    if settings.max_tokens is not None:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(settings.max_tokens)
    if not settings.thinking:
        env["CLAUDE_CODE_DISABLE_THINKING"] = "1"
    return env


def stdin_line(message: dict) -> bytes:
    # ASCII escapes: a lone surrogate (a JS client cutting an emoji in half) is
    # valid JSON as \udfff but cannot be encoded as UTF-8.
    return (json.dumps(message) + "\n").encode("ascii")


def user_line(turn: Turn, query: bool = True) -> bytes:
    message = {"type": "user", "message": {"role": "user", "content": _no_slash_command(turn.content)}}
    if not query:
        message["shouldQuery"] = False  # history only: the CLI adds it without calling the API
    return stdin_line(message)


def _no_slash_command(content: list) -> list:
    """Keep text like "/cost" for the model.

    Even with --disable-slash-commands, the CLI treats a user line whose text
    starts with "/" as one of its own commands: it answers "/cost isn't
    available" without calling the model, or adds a reminder about it. A "/"
    in a block of its own reaches the model as it is.
    """
    first = content[0] if content else {}
    if first.get("type") == "text" and first["text"].startswith("/") and len(first["text"]) > 1:
        return [{"type": "text", "text": "/"}, dict(first, text=first["text"][1:]), *content[1:]]
    return content


def assistant_line(turn: Turn) -> bytes:
    return stdin_line({"type": "assistant", "message": {"role": "assistant", "content": turn.content}})


def control_line(request_id: str, subtype: str, **fields) -> bytes:
    return stdin_line({"type": "control_request", "request_id": request_id,
                       "request": {"subtype": subtype, **fields}})


def initialize_line(settings: SessionSettings) -> bytes:
    # The system prompt goes on stdin, not argv: clients send tens of KB of it.
    fields: dict = {"systemPrompt": settings.system_prompt, "sdkMcpServers": [TOOL_SERVER]}
    if settings.output_schema is not None:
        fields["jsonSchema"] = settings.output_schema
    return control_line("init", "initialize", **fields)


def control_reply(request_id: str, response: Optional[dict] = None, error: Optional[str] = None) -> bytes:
    if error is not None:
        return stdin_line({"type": "control_response", "response": {
            "subtype": "error", "request_id": request_id, "error": error}})
    return stdin_line({"type": "control_response", "response": {
        "subtype": "success", "request_id": request_id, "response": response or {}}})


def deny_tool_line(request_id: str, message: str = "The client runs this function.",
                   end_turn: bool = True) -> bytes:
    """Refuse a tool run; by default also end the turn, since the client runs its functions itself."""
    return control_reply(request_id, {"behavior": "deny", "message": message, "interrupt": end_turn})


def mcp_reply(message: dict, tools: Sequence[FunctionTool], results: Mapping[str, str]) -> dict:
    """Answer the CLI's JSON-RPC message to our tool server ({} for a notification).

    A tools/call is answered with the client's result for that call: the CLI
    asks for one only after we allowed the run, which we do once we have it.
    """
    method, request_id = message.get("method"), message.get("id")
    if request_id is None:
        return {}
    if method == "initialize":
        version = (message.get("params") or {}).get("protocolVersion") or "2025-11-25"
        result = {"protocolVersion": version, "capabilities": {"tools": {}},
                  "serverInfo": {"name": TOOL_SERVER, "version": __version__}}
    elif method == "tools/list":
        result = {"tools": [{"name": tool.name, "description": tool.description, "inputSchema": tool.parameters,
                             "_meta": {"anthropic/maxResultSizeChars": MAX_RESULT_CHARS}} for tool in tools]}
    elif method == "tools/call" and tool_use_id_of(message) in results:
        result = {"content": [{"type": "text", "text": results[tool_use_id_of(message)]}]}
    else:
        return {"jsonrpc": "2.0", "id": request_id,
                "error": {"code": -32601, "message": f"{method} is not served by claude-max-proxy"}}
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def tool_use_id_of(message: dict) -> Optional[str]:
    """The tool_use id a tools/call runs, as the CLI names it."""
    params = message.get("params") if isinstance(message.get("params"), dict) else {}
    return (params.get("_meta") or {}).get("claudecode/toolUseId")


def dropped_tools(init: dict, tools: Sequence[FunctionTool]) -> List[str]:
    """The client's tools that the CLI left out of its session (it drops a tool whose schema it rejects)."""
    offered = set(init.get("tools") or ())
    return [tool.name for tool in tools if tool.name not in offered]


def read_cli_version(config: Config) -> str:
    """Run `claude --version`; raise RuntimeError with a one-line fix if it cannot run."""
    env = build_cli_env(os.environ, config, LaunchSettings(model="sonnet"))
    try:
        done = subprocess.run([config.claude, "--version"], capture_output=True, env=env, timeout=60)
    except FileNotFoundError:
        raise RuntimeError(f"the Claude Code CLI '{config.claude}' was not found; "
                           f"install it with `{INSTALL_HINT}` or pass --claude PATH") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"the Claude Code CLI '{config.claude}' does not run ({exc}); "
                           f"reinstall it with `{INSTALL_HINT}`") from None
    output = done.stdout.decode("utf-8", "replace").strip()
    if done.returncode != 0 or not output:
        detail = (done.stderr.decode("utf-8", "replace").strip() or output)[-200:]
        raise RuntimeError(f"the Claude Code CLI '{config.claude}' failed with status "
                           f"{done.returncode} ({detail}); reinstall it with `{INSTALL_HINT}`")
    return output.split()[0]


class ClaudeProcess:
    """One `claude -p` child speaking stream-json.

    It starts with its launch settings and no conversation, so it can be
    started before a request arrives; initialize() gives it a request's session,
    and each run_turn() is one turn. `state` says where a turn left it: "idle"
    after a turn the CLI ended as the client saw it, "holding" when the turn
    waits inside the CLI for the results of Claude's calls to the client's
    functions, "spoiled" after anything else, and "fresh" before any turn.
    """

    def __init__(self, config: Config, settings: LaunchSettings, windows: Optional["UsageWindows"] = None):
        self.launch = settings
        self.windows = windows or UsageWindows()  # where the subscription's windows go when the CLI reports them
        self.launch_key = digest(settings)
        self.started = self.last_used = time.monotonic()
        self.state = "fresh"
        self.turn_end: Optional[TurnEnd] = None  # how the last turn ended, when it did
        self.conversation: Optional[Conversation] = None  # what it has seen, once a pool keeps it
        self.counted = Usage()  # usage reported so far for the CLI's turn, while it holds calls
        self.binary = binary_identity(config.claude)
        self.workdir = tempfile.mkdtemp(prefix="claude-max-proxy-")  # no CLAUDE.md, no project files
        # stderr goes to a file, not a PIPE: nobody drains a PIPE while we read
        # stdout, and a child that fills one with warnings blocks forever.
        self._stderr = tempfile.TemporaryFile()
        self._lines: "queue.Queue[Optional[List[bytes]]]" = queue.Queue()  # batches of stdout lines
        self._batch: deque = deque()  # the events of the batch being read
        # Writes go through a thread: a child that stops reading must not block
        # the request thread, which watches the deadline and the client.
        self._stdin: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._lock = threading.Lock()
        self.turn_finished = True  # no turn is under way: closing stdin lets the CLI exit by itself
        self.tools: Tuple[FunctionTool, ...] = ()
        self.session_key: Optional[str] = None  # the digest of the session it was given, once it was
        self._tool_server = threading.Lock()  # tools, results and the held tool list, shared with the reader
        self._listing: Optional[Tuple[str, dict]] = None
        # Claude's calls to the client's functions: the CLI asks to run each,
        # and we answer once the client has sent its result, or refuse. We
        # refuse only once Claude's message is complete: refusing ends the
        # turn, which would cut off the calls Claude is still writing.
        self.asked: Dict[str, Tuple[str, dict]] = {}  # tool_use id → (the CLI's request id, the call's input)
        self.results: Dict[str, str] = {}  # tool_use id → the client's result, until the CLI takes it
        self.holding: frozenset = frozenset()  # the tool_use ids of the calls a held turn waits for
        self.message_streaming = False
        self.ending = False
        try:
            self.popen = subprocess.Popen(
                build_cli_argv(config.claude, settings), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self._stderr, cwd=self.workdir, env=build_cli_env(os.environ, config, settings),
                start_new_session=True)  # Ctrl-C reaches us, and we stop the children ourselves
        except OSError as exc:
            self._cleanup()
            raise ApiError(502, f"Could not start the Claude Code CLI: {exc}", code="cli_failed") from None
        try:
            threading.Thread(target=self._read_stdout, name=f"cli-out-{self.popen.pid}", daemon=True).start()
            threading.Thread(target=self._write_stdin, name=f"cli-in-{self.popen.pid}", daemon=True).start()
        except BaseException:  # no thread to spare: the child must not outlive this
            self.close()
            raise

    def initialize(self, session: SessionSettings):
        with self._tool_server:
            self.tools = session.tools
            self.session_key = digest(session)
            self.write(initialize_line(session))
            if self._listing is not None:  # the CLI asked for the tool list while it waited for a session
                self._reply_to_tool_server(*self._listing)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _read_stdout(self):
        # What the CLI has written goes over at once: a burst of deltas is
        # passed on, and then sent to the client, as one batch, not line by line.
        # Each batch is put on the queue as soon as it is read: the pause only
        # lets the next one gather.
        partial = b""
        with self.popen.stdout:  # closed here: another thread closing it could block on its lock
            for data in iter(lambda: self.popen.stdout.read1(1 << 16), b""):
                chunk = partial + data
                lines = chunk.split(b"\n")
                partial = lines.pop()
                if b'"control_request"' in chunk:  # (a line may have begun in an earlier read)
                    lines = [line for line in lines if not self._served_by_tool_server(line)]
                if lines:
                    self._lines.put(lines)
                time.sleep(READ_PAUSE_SECONDS)
        if partial:
            self._lines.put([partial])
        self._lines.put(None)

    def _write_stdin(self):
        try:
            for data in iter(self._stdin.get, None):
                self.popen.stdin.write(data)
                self.popen.stdin.flush()
            self.popen.stdin.close()  # after a result, the CLI then exits by itself
        except (OSError, ValueError):
            pass  # the child is gone; the stdout reader reports how

    def write(self, data: bytes):
        self._stdin.put(data)

    def next_event(self, timeout: float) -> Optional[dict]:
        """The next stdout line as a dict, or None if nothing came within `timeout`.

        The CLI's own requests to us (tool server messages, permission to run
        a tool) are answered here and not returned.
        """
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_event(deadline - time.monotonic())
            if event is None or event.get("type") != "control_request":
                return event
            self._answer(event.get("request_id"), event.get("request") or {})

    def has_output(self) -> bool:
        """Whether the CLI has written lines not read yet."""
        return bool(self._batch) or not self._lines.empty()

    def _read_event(self, timeout: float) -> Optional[dict]:
        if not self._batch:
            try:
                lines = self._lines.get(timeout=max(timeout, 0))
            except queue.Empty:
                return None
            if lines is None:
                self._lines.put(None)  # every later call sees the exit too
                raise self._exit_error()
            self._batch.extend(stream_json_events(lines))
        event = self._batch.popleft()
        if isinstance(event, bytes):
            raise ApiError(502, "The Claude Code CLI printed something that is not stream-json: "
                                      f"{event[:200].decode('utf-8', 'replace').strip()!r}", code="cli_bad_output")
        kind = event.get("type")
        if kind == "result":
            self.turn_finished = True
        elif kind == "stream_event":
            stream_kind = (event.get("event") or {}).get("type")
            if stream_kind == "message_start":
                self.message_streaming = True
            elif stream_kind == "message_stop":
                self.message_streaming = False
        elif kind == "rate_limit_event":
            self.windows.seen(event.get("rate_limit_info"))
        elif kind == "system" and event.get("subtype") == "init" and self.tools:
            dropped = dropped_tools(event, self.tools)
            if dropped:
                raise ApiError(400, f"Claude Code rejected the JSON schema of {', '.join(dropped)}; check the "
                                    "tool's 'parameters' against JSON Schema.", param="tools",
                               code="invalid_tool_schema")
        return event

    def _served_by_tool_server(self, line: bytes) -> bool:
        """Answer a message to our tool server here, in the reader, as soon as it comes: the CLI
        never waits for a request to read it, and the handshake is done before a request comes.
        Only a request for the tool list waits, for the session that has the tools."""
        if b'"control_request"' not in line[:32]:
            return False
        try:
            event = json.loads(line)
        except ValueError:
            return False
        request = event.get("request") if isinstance(event, dict) else None
        if not isinstance(request, dict) or request.get("subtype") != "mcp_message":
            return False
        message = request.get("message") if isinstance(request.get("message"), dict) else {}
        with self._tool_server:
            if message.get("method") == "tools/list" and self.session_key is None:
                self._listing = (event.get("request_id"), message)
            else:
                self._reply_to_tool_server(event.get("request_id"), message)
        return True

    def _reply_to_tool_server(self, request_id: str, message: dict):
        self.write(control_reply(request_id, {"mcp_response": mcp_reply(message, self.tools, self.results)}))
        self.results.pop(tool_use_id_of(message), None)

    def _answer(self, request_id: str, request: dict):
        subtype = request.get("subtype")
        if subtype == "can_use_tool" and any(tool.name == request.get("tool_name") for tool in self.tools):
            call_id = request.get("tool_use_id")
            self.asked[call_id] = (request_id, request.get("input") or {})
            if call_id in self.results:
                self._allow(call_id)
            elif self.ending or not (self.message_streaming or call_id in self.holding):
                self.refuse_asked()
        elif subtype == "can_use_tool":  # not the client's: no tool of Claude Code's own may run
            self.write(deny_tool_line(request_id, f"There is no tool named {request.get('tool_name')}.",
                                      end_turn=False))
        else:
            self.write(control_reply(request_id, error=f"claude-max-proxy does not handle {subtype}"))

    def refuse_asked(self):
        """Refuse every call the CLI asked to run and we have not answered: the client runs them."""
        for request_id, _ in self.asked.values():
            self.write(deny_tool_line(request_id))
        self.asked.clear()

    def _allow(self, call_id: str):
        request_id, tool_input = self.asked.pop(call_id)
        self.write(control_reply(request_id, {"behavior": "allow", "updatedInput": tool_input}))

    def give_results(self, results: Mapping[str, str]):
        """The client's results for the calls a held turn waits for: the CLI's turn goes on."""
        with self._tool_server:
            self.results.update(results)
        for call_id in [call_id for call_id in self.asked if call_id in self.results]:
            self._allow(call_id)

    def send_conversation(self, history: Sequence[Turn], prompt: Turn, deadline: float):
        """Seed earlier turns, then ask the prompt (PROTOCOL.md §3.3).

        An assistant line joins the history the moment it is read, while user
        lines queue as turns; so each history user line must finish (its result
        arrives) before the next assistant line is written.
        """
        for turn in history:
            if turn.role == "assistant":
                self.write(assistant_line(turn))
            else:
                self.write(user_line(turn, query=False))
                self._await_result(deadline)
        self.turn_finished = False
        self.write(user_line(prompt))

    def _await_result(self, deadline: float):
        while True:
            event = self.next_event(deadline - time.monotonic())
            if event is None:
                raise ApiError(504, "Timed out while the Claude Code CLI took in the conversation.",
                               code="timeout")
            if event.get("type") == "result":
                return

    def run_turn(self, request: ChatRequest, history: Sequence[Turn], timeout: float,
                 client_gone: Callable[[], bool], results: Optional[Mapping[str, str]] = None,
                 hold_calls: bool = False) -> Iterator:
        """Go on with the request's conversation, and yield Claude's answer.

        The CLI is given `history` (the turns of the request it has not seen)
        and the request's prompt; or, when it holds Claude's calls, their
        `results` (by Claude's tool_use id). With `hold_calls`, a turn that
        ends in calls to the client's functions waits for their results in the
        CLI. Yields TurnStart, TextDelta, ThinkingSignature and ToolCallDelta
        as they come, None whenever the CLI has nothing more for now (and every
        POLL_SECONDS while it is silent), and last TurnEnd. Raises ApiError, or ClientGone once
        client_gone() says the client left.
        """
        deadline = time.monotonic() + timeout
        self.state = "spoiled"  # until the turn ends as the client sees it
        if results is None:
            self.send_conversation(history, request.prompt, deadline)
        else:
            self.give_results(results)
        translator = TurnTranslator(
            request.stop, live=request.stream, tools=[tool.name for tool in request.session.tools],
            one_tool_call=request.one_tool_call, structured=request.session.output_schema is not None,
            hold_calls=hold_calls, counted=self.counted)
        checked = time.monotonic()
        interrupted = False
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ApiError(504, f"Claude did not finish within {timeout:g} s (--timeout).", code="timeout")
            if now - checked >= POLL_SECONDS:
                checked = now
                if client_gone():
                    raise ClientGone()
            if not self.has_output():
                yield None  # the caller may send what it holds: nothing more is here yet
            event = self.next_event(min(POLL_SECONDS, deadline - now))
            if event is None:
                continue
            for out in translator.feed(event):
                if isinstance(out, TurnEnd):
                    self._ended(out, translator.cli_state)
                yield out
                if isinstance(out, TurnEnd):
                    return
            if (event.get("event") or {}).get("type") == "message_stop":
                self.refuse_asked()  # Claude's message is complete, and no turn holds its calls
            if translator.ended_by and not interrupted and not (hold_calls and translator.ended_by == "tool_use"):
                interrupted = True  # stop Claude (and the CLI) going past the end we chose
                self.end_turn()

    def _ended(self, end: TurnEnd, cli_state: Optional[str]):
        self.turn_end = end
        self.state = cli_state or "spoiled"
        self.holding = frozenset(call.id for call in end.tool_calls) if cli_state == "holding" else frozenset()
        self.counted = self.counted + end.usage if cli_state == "holding" else Usage()

    def end_turn(self):
        """Stop Claude here: the proxy has all of the answer it will send."""
        self.ending = True
        self.refuse_asked()
        self.write(control_line("stop", "interrupt"))

    def close(self):
        """Stop the child: gently after a finished turn, at once otherwise."""
        with self._lock:
            self._stdin.put(None)  # ends the writer thread, and stdin with it
            if not self.turn_finished:
                self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(EXIT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
            self._signal_group(signal.SIGKILL)  # anything the CLI started and left behind
            self._cleanup()

    def _signal_group(self, signum: int):
        # The child leads its own process group (start_new_session), so this
        # reaches whatever it started too, which could hold its stdout open.
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _cleanup(self):
        self._stderr.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _exit_error(self) -> ApiError:
        try:
            status = self.popen.wait(EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            status = None
        try:
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        except (OSError, ValueError):
            lines = []
        detail = f": {lines[-1][:300]}" if lines else ""
        return ApiError(502, f"The Claude Code CLI exited (status {status}) without "
                                   f"an answer{detail}", code="cli_failed")


# A kept CLI's conversation, and how a request goes on with it (pure).

@dataclass(frozen=True)
class Conversation:
    """What a kept CLI has seen, as the next request of its conversation tells it."""
    tenant: str             # a digest of the API key its requests carried
    session: str            # the digest of its SessionSettings
    turns: Tuple[str, ...]  # its canonical_turns, the last answer included
    calls: Mapping[str, str] = field(default_factory=dict)  # held calls: Claude's id by label in `turns`


@dataclass(frozen=True)
class Continuation:
    """What a CLI is given of a request: the turns it lacks before the prompt,
    or, when it holds Claude's calls, their results (by Claude's id)."""
    history: Tuple[Turn, ...] = ()
    results: Optional[Dict[str, str]] = None


def conversation_of(request: ChatRequest, end: TurnEnd, tenant: str, holding: bool) -> Optional[Conversation]:
    """The conversation a CLI has after answering `request` with `end`, if a client can tell it again."""
    answer = answer_turn(end)
    if answer is None:
        return None
    texts, labels = canonical_turns([*request.history, request.prompt, answer])
    calls = {labels[call.id]: call.id for call in end.tool_calls} if holding else {}
    return Conversation(tenant, digest(request.session), tuple(texts), calls)


def continuation(kept: Conversation, turns: Sequence[Turn], texts: Sequence[str],
                 labels: Mapping[str, str]) -> Optional[Continuation]:
    """How a request whose turns are `turns` (canonically `texts`, with `labels`)
    goes on with `kept`, or None if it does not go on with it.

    It must repeat the conversation and add to it. When the CLI holds Claude's
    calls, it must add just their results, one for each, which the CLI can
    pass on as they are: text (Claude Code shows a tool without output as
    something else) of at most MAX_RESULT_CHARS.
    """
    seen = len(kept.turns)
    if len(texts) <= seen or tuple(texts[:seen]) != kept.turns:
        return None
    prompt = turns[-1]
    answers_calls = any(block["type"] == "tool_result" for block in prompt.content)
    if not kept.calls:  # a later tool result answers a call the client added: only a fresh CLI takes that
        return None if answers_calls else Continuation(tuple(turns[seen:-1]))
    if len(texts) != seen + 1 or not all(block["type"] == "tool_result" for block in prompt.content):
        return None
    results = {}
    for block in prompt.content:
        text = "".join(part["text"] for part in block.get("content") or [])
        call_id = kept.calls.get(labels[block["tool_use_id"]])
        if call_id is None or not text or len(text) > MAX_RESULT_CHARS:
            return None
        results[call_id] = text
    return Continuation(results=results) if len(results) == len(kept.calls) else None


# Every CLI the proxy holds, spare, running or kept, within one budget (I/O).

KEEPER_SECONDS = 1.0  # how often the pool looks for processes to retire or start
# A spare starts once the requests that just began have had this long to start
# their own turns, or have ended: a CLI starting takes half a second of a core.
REFILL_DELAY_SECONDS = 0.5
LAUNCHES_REMEMBERED = 16  # launch settings whose latest session the pool remembers


def binary_identity(claude: str) -> Optional[Tuple[int, int, int]]:
    """What tells a new install of the CLI from the one a process was started from."""
    try:
        found = os.stat(shutil.which(claude) or claude)
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


@dataclass(frozen=True)
class Wanted:
    """A spare the pool keeps: for the launch settings of a recent new conversation, started
    ahead with its session too when its client sent the same session twice in a row."""
    since: float
    launch: LaunchSettings
    session: Optional[SessionSettings] = None

    @property
    def key(self) -> Tuple[str, Optional[str]]:
        return digest(self.launch), self.session and digest(self.session)


@dataclass
class Lease:
    """A CLI a request has, how it came to have it, and what the CLI is given."""
    cli: ClaudeProcess
    served: str  # "cold", "warm" (a spare) or "continued"
    given: Continuation
    hold_calls: bool
    put_back: Callable[[], List["ClaudeProcess"]]  # the pool takes the CLI back; what it must stop
    handed_back: bool = False
    to_stop: List["ClaudeProcess"] = field(default_factory=list)  # once the client has its answer

    def run_turn(self, request: ChatRequest, timeout: float, client_gone: Callable[[], bool]) -> Iterator:
        return self.cli.run_turn(request, self.given.history, timeout, client_gone, self.given.results,
                                 self.hold_calls)

    def hand_back(self):
        """Give the CLI back once its turn has ended: before the client hears the end, so that the
        client's next request, which may come at once, finds it."""
        if not self.handed_back:
            self.handed_back = True
            self.to_stop = self.put_back()


class ProcessPool:
    """Every CLI process the proxy holds, within one budget (--max-processes).

    A process is running (a request has it), spare (started ahead, waiting
    for a request's session), live (a finished conversation, waiting for its
    next request) or held (a conversation whose turn waits, inside the CLI,
    for the results of Claude's calls). A request takes the live or held
    process its conversation goes on with; else a spare started with its
    launch settings; else a new one, for which the least recently used
    process no request has makes room. The spares follow the latest new
    conversations (see Wanted), since a client sends the same settings each
    time: given its session ahead, a spare answers a quarter sooner. A keeper
    thread starts them, and retires what waited too long, died, or was started
    from a CLI since replaced.
    """

    def __init__(self, config: Config, stopping: threading.Event, windows: "UsageWindows"):
        self.config = config
        self.stopping = stopping  # once set, no process is started or kept
        self.windows = windows
        self._lock = threading.Condition()
        self._running: set = set()
        self._idle: "OrderedDict[ClaudeProcess, None]" = OrderedDict()  # least recently used first
        self._starting = self._closing = 0  # processes on their way in or out, counted in the budget
        self.starts = 0  # ever
        self._wanted: List[Wanted] = []  # for the latest new conversations, oldest first
        self._last_session: "OrderedDict[str, str]" = OrderedDict()  # launch digest → its latest session's
        self._refill_after = 0.0  # no spare starts before this time.monotonic()
        threading.Thread(target=self._keep, name="cli-pool", daemon=True).start()

    @contextmanager
    def lease(self, request: ChatRequest, tenant: str) -> Iterator[Lease]:
        """A CLI for the request; kept after a turn the client saw whole, else stopped."""
        lease = self._claim(request, tenant)
        try:
            yield lease
            lease.hand_back()
        except BaseException:  # the client may not have the whole answer
            self._retire(lease.cli, lease.handed_back)
            raise
        finally:  # what the pool no longer keeps is stopped apart: the client's next request need not wait
            if lease.to_stop:  # (not a daemon: the proxy does not exit before they are stopped)
                threading.Thread(target=self._stop, args=(lease.to_stop,), name="cli-stop").start()

    def _claim(self, request: ChatRequest, tenant: str) -> Lease:
        turns = [*request.history, request.prompt]
        texts, labels = canonical_turns(turns)
        hold_calls = self.config.conversations > 0 and not request.one_tool_call
        launch = request.fresh_launch
        with self._lock:
            if self.stopping.is_set():
                raise shutting_down()
            cli, given, unusable = self._kept_for(request, tenant, turns, texts, labels)
            served = "continued"
            if cli is None:
                self._want(launch, request.session)
                cli, stale = self._spare_for(launch, request.session)
                unusable += stale
                given, served = Continuation(tuple(request.history)), "warm"
            if cli is None:
                unusable += self._make_room()
                self._starting += 1
                self.starts += 1
            else:
                self._running.add(cli)
            self._closing += len(unusable)
            self._refill_after = max(self._refill_after, time.monotonic() + REFILL_DELAY_SECONDS)
        self._stop(unusable)
        if cli is None:
            cli, served = self._start(launch, for_request=True), "cold"
        try:
            if cli.session_key is None:
                cli.initialize(request.session)
        except BaseException:
            self._retire(cli, handed_back=False)
            raise
        return Lease(cli, served, given, hold_calls, lambda: self._put_back(cli, request, tenant))

    def _kept_for(self, request: ChatRequest, tenant: str, turns, texts, labels) -> tuple:
        """The kept process the request goes on with, what it is given, and kept processes it leaves unusable."""
        launches = {digest(request.launch), digest(request.fresh_launch)}
        session = digest(request.session)
        found, given, unusable = None, None, []
        for cli in self._idle:
            kept = cli.conversation
            if kept is None or (kept.tenant, kept.session) != (tenant, session) or cli.launch_key not in launches:
                continue
            goes_on = continuation(kept, turns, texts, labels)
            if goes_on is None and kept.calls and tuple(texts[:len(kept.turns) - 1]) == kept.turns[:-1]:
                unusable.append(cli)  # the client went on from before its calls, or answered them as it cannot take
            elif goes_on is not None and not cli.alive():
                unusable.append(cli)
            elif goes_on is not None and (found is None or len(kept.turns) > len(found.conversation.turns)):
                found, given = cli, goes_on
        for cli in [*unusable, *([found] if found else [])]:
            del self._idle[cli]
        return found, given, unusable

    def _want(self, launch: LaunchSettings, session: SessionSettings):
        """Learn from a new conversation what spares to keep."""
        launch_key, session_key = digest(launch), digest(session)
        repeated = self._last_session.pop(launch_key, None) == session_key
        self._last_session[launch_key] = session_key
        while len(self._last_session) > LAUNCHES_REMEMBERED:
            self._last_session.popitem(last=False)
        wanted = [*self._wanted, Wanted(time.monotonic(), launch, session if repeated else None)]
        self._wanted = wanted[-self.config.spares:] if self.config.spares else []

    def _spare_for(self, launch: LaunchSettings, session: SessionSettings) -> tuple:
        """A spare for the request, checked: one given its session ahead, else one started with its
        launch settings and no session yet. Also the spares found dead or stale."""
        key, binary, unusable = digest(launch), binary_identity(self.config.claude), []
        fitting = []
        for cli in reversed(self._idle):  # the newest first
            if cli.conversation is None and cli.launch_key == key and cli.session_key in (None, digest(session)):
                (fitting if cli.alive() and cli.binary == binary else unusable).append(cli)
        for cli in unusable:
            del self._idle[cli]
        if not fitting:
            return None, unusable
        found = min(fitting, key=lambda cli: cli.session_key is None)  # one that has the session, if any
        del self._idle[found]
        return found, unusable

    def _make_room(self) -> List[ClaudeProcess]:
        """The least recently used idle processes that must go for one more to fit the budget."""
        victims = []
        while self._idle and self._total() >= self.config.max_processes:
            victims.append(self._idle.popitem(last=False)[0])
        return victims

    def _total(self) -> int:
        return len(self._running) + len(self._idle) + self._starting + self._closing

    def _start(self, launch: LaunchSettings, for_request: bool,
               session: Optional[SessionSettings] = None) -> Optional[ClaudeProcess]:
        """Start a CLI for a request (which then has it) or as a spare, given a session ahead if
        `session`; None if the pool closed meanwhile. Counted from before it is spawned, and stopped
        whatever goes wrong after."""
        cli = None
        try:
            cli = ClaudeProcess(self.config, launch, self.windows)
            if session is not None:
                cli.initialize(session)
        except BaseException:
            with self._lock:
                self._starting -= 1
                self._closing += cli is not None
            if cli is not None:
                self._stop([cli])
            raise
        with self._lock:
            self._starting -= 1
            stopping = self.stopping.is_set()
            if stopping:
                self._closing += 1
            elif for_request:
                self._running.add(cli)
            else:
                self._idle[cli] = None
        if stopping:  # checked after starting it: close() saw it counted, or we see the stop
            self._stop([cli])
            if for_request:
                raise shutting_down()
            return None
        return cli

    def _put_back(self, cli: ClaudeProcess, request: ChatRequest, tenant: str) -> List[ClaudeProcess]:
        """After a turn the client saw whole: keep its conversation; return what is to be stopped."""
        kept = None
        if self.config.conversations and cli.state in ("idle", "holding") and cli.alive():
            kept = conversation_of(request, cli.turn_end, tenant, holding=cli.state == "holding")
        with self._lock:
            self._running.discard(cli)
            if kept is None or self.stopping.is_set():
                unusable = [cli]
            else:
                cli.conversation, cli.last_used = kept, time.monotonic()
                self._idle[cli] = None
                unusable = self._too_many_conversations()
            self._closing += len(unusable)
            self._turn_over()
        return unusable

    def _too_many_conversations(self) -> List[ClaudeProcess]:
        kept = [cli for cli in self._idle if cli.conversation is not None]  # least recently used first
        excess = kept[:max(len(kept) - self.config.conversations, 0)]
        for cli in excess:
            del self._idle[cli]
        return excess

    def _retire(self, cli: ClaudeProcess, handed_back: bool):
        with self._lock:
            if not handed_back:
                self._running.discard(cli)
            elif cli in self._idle:
                del self._idle[cli]
            else:
                return  # stopped already, or its conversation's next request has it
            self._closing += 1
            self._turn_over()
        self._stop([cli])

    def _turn_over(self):
        """A request's turn ended: with none under way, spares may start at once."""
        if not self._running:
            self._refill_after = 0.0
        self._lock.notify_all()

    def _stop(self, processes: Sequence[ClaudeProcess]):
        """Stop processes taken out of the pool (and counted in _closing meanwhile)."""
        for cli in processes:
            cli.close()
        with self._lock:
            self._closing -= len(processes)
            self._lock.notify_all()

    def _keep(self):
        """The keeper thread: retire what waited too long, died or went stale; start the spares wanted."""
        while True:
            with self._lock:
                until_refill = self._refill_after - time.monotonic()
                self._lock.wait(min(until_refill, KEEPER_SECONDS) if until_refill > 0 else KEEPER_SECONDS)
                if self.stopping.is_set():
                    return
                unusable = self._expired()
                self._closing += len(unusable)
                wanted = self._missing_spares() if time.monotonic() >= self._refill_after else []
                self._starting += len(wanted)
                self.starts += len(wanted)
            self._stop(unusable)
            for spare in wanted:
                try:
                    self._start(spare.launch, for_request=False, session=spare.session)
                except ApiError as err:
                    log.warning("could not start a spare CLI: %s", err.message)
                except Exception:  # a bug: the keeper must go on keeping
                    log.exception("could not start a spare CLI")

    def _expired(self) -> List[ClaudeProcess]:
        now, binary = time.monotonic(), binary_identity(self.config.claude)
        self._wanted = [spare for spare in self._wanted if now - spare.since < self.config.spare_timeout]
        wanted = [spare.key for spare in self._wanted]
        expired = []
        for cli in reversed(self._idle):  # the newest spare of a kind is the one kept
            if cli.conversation is None:
                gone = (cli.launch_key, cli.session_key) not in wanted or cli.binary != binary
                if not gone:
                    wanted.remove((cli.launch_key, cli.session_key))
            else:
                gone = now - cli.last_used > self.config.conversation_timeout
            if gone or not cli.alive():
                expired.append(cli)
        for cli in expired:
            del self._idle[cli]
        return expired

    def _missing_spares(self) -> List[Wanted]:
        """The spares to start: those wanted and not there, as the budget allows."""
        have = [(cli.launch_key, cli.session_key) for cli in self._idle if cli.conversation is None]
        missing = []
        for spare in self._wanted:
            if spare.key in have:
                have.remove(spare.key)
            else:
                missing.append(spare)
        return missing[:max(self.config.max_processes - self._total(), 0)]

    def close(self):
        """Take no more requests, and stop every process no request has."""
        with self._lock:
            self.stopping.set()
            idle = list(self._idle)
            self._idle.clear()
            self._closing += len(idle)
        self._stop(idle)

    def running(self) -> List[ClaudeProcess]:
        with self._lock:
            return list(self._running)

    def counts(self) -> dict:
        """The processes in each state, and the budget they share."""
        with self._lock:
            kept = [cli.conversation for cli in self._idle]
            return {"running": len(self._running) + self._starting + self._closing,
                    "live": sum(1 for c in kept if c is not None and not c.calls),
                    "held": sum(1 for c in kept if c is not None and c.calls),
                    "spare": sum(1 for c in kept if c is None), "limit": self.config.max_processes}


# ── 6. Claude's events: stream-json lines → TextDelta / TurnEnd (pure) ──────

DELTA_TEXT = {"text_delta": "text", "thinking_delta": "thinking"}  # a delta's type → its text's key

# The CLI writes every text delta's line in this shape (JSON.stringify, keys in
# this order): such a line, when its text has nothing escaped, is read without
# parsing it, which in a long answer saves most of the proxy's work. Its other
# keys (uuid, session_id) are not used. Any other line is parsed whole.
TEXT_DELTA_LINE = re.compile(rb'\{"type":"stream_event","event":\{"type":"content_block_delta","index":(\d{1,9}),'
                             rb'"delta":\{"type":"(text_delta","text|thinking_delta","thinking)":"([^"\\]*)"\}\}')
DELTA_LINE_KINDS = {b'text_delta","text': "text_delta", b'thinking_delta","thinking': "thinking_delta"}


def stream_json_events(lines: Sequence[bytes]) -> list:
    """A batch of the CLI's lines as events, each run of text (or thinking) deltas of one block as one delta.

    A burst of thousands of deltas then costs one translation and one frame,
    not one each. A line that is not a JSON object stays as its bytes, for the
    reader to report.
    """
    events, block, pieces = [], None, []  # pieces: the text of the last event, while it is a delta of `block`
    for raw in lines:
        delta = read_text_delta(raw)
        event = None if delta else line_event(raw)
        delta = delta or _text_delta(event)
        if delta and delta[:2] == block:
            pieces.append(delta[2])
            continue
        _join_text(events, pieces)
        events.append(text_delta_event(*delta) if event is None else event)
        block, pieces = (delta[:2], [delta[2]]) if delta else (None, [])
    _join_text(events, pieces)
    return events


def read_text_delta(raw: bytes) -> Optional[tuple]:
    """(block index, delta type, text) of a plain delta line in the CLI's own shape, else None."""
    delta = TEXT_DELTA_LINE.match(raw)
    try:
        return (int(delta[1]), DELTA_LINE_KINDS[delta[2]], delta[3].decode()) if delta else None
    except UnicodeDecodeError:  # the line is parsed whole, and reported
        return None


def text_delta_event(index: int, kind: str, text: str) -> dict:
    return {"type": "stream_event", "event": {"type": "content_block_delta", "index": index,
                                              "delta": {"type": kind, DELTA_TEXT[kind]: text}}}


def line_event(raw: bytes) -> Union[dict, bytes]:
    """One line of the CLI's as an event, or as its bytes if it is not a JSON object."""
    try:
        event = json.loads(raw.decode())  # from str: json.loads would first guess the bytes' encoding
    except ValueError:  # UnicodeDecodeError too
        return raw
    return event if isinstance(event, dict) else raw


def _text_delta(event) -> Optional[tuple]:
    """(block index, delta type, text) of a text or thinking delta event, else None."""
    if not isinstance(event, dict) or event.get("type") != "stream_event":
        return None
    inner = event.get("event")
    if not isinstance(inner, dict) or inner.get("type") != "content_block_delta":
        return None
    delta = inner.get("delta")
    key = DELTA_TEXT.get(delta.get("type")) if isinstance(delta, dict) else None
    text = delta.get(key) if key else None
    return (inner.get("index"), delta["type"], text) if isinstance(text, str) else None


def _join_text(events: list, pieces: List[str]):
    """Give the last event, a text delta, the text of the run of deltas it began."""
    if len(pieces) > 1:
        delta = events[-1]["event"]["delta"]
        delta[DELTA_TEXT[delta["type"]]] = "".join(pieces)


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_claude(cls, usage: Optional[dict]) -> "Usage":
        usage = usage or {}
        return cls(input_tokens=usage.get("input_tokens") or 0,
                   output_tokens=usage.get("output_tokens") or 0,
                   cache_read_tokens=usage.get("cache_read_input_tokens") or 0,
                   cache_write_tokens=usage.get("cache_creation_input_tokens") or 0,
                   reasoning_tokens=(usage.get("output_tokens_details") or {}).get("thinking_tokens") or 0)

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other))))

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(*(mine - theirs for mine, theirs in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class TextDelta:
    text: str
    reasoning: bool = False  # thinking, sent as reasoning_content


@dataclass(frozen=True)
class TurnStart:
    usage: Usage  # what Claude's message began with: its input, as Anthropic's message_start says


@dataclass(frozen=True)
class ThinkingSignature:
    signature: str  # Anthropic's seal on the thinking just written


@dataclass(frozen=True)
class ToolCallDelta:
    index: int                  # which call of this answer, from 0
    arguments: str              # the next piece of its JSON arguments
    id: Optional[str] = None    # id and name come with a call's first piece only
    name: Optional[str] = None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class TurnEnd:
    stop_reason: Optional[str]  # Claude's: end_turn, max_tokens, stop_sequence, tool_use, ...
    usage: Usage
    text: str = ""       # the whole answer, as sent
    reasoning: str = ""  # the whole thinking, as sent
    tool_calls: Tuple[ToolCall, ...] = ()
    stop_sequence: Optional[str] = None  # the client's, when one ended the answer
    signature: str = ""  # the last ThinkingSignature


def answer_turn(end: TurnEnd) -> Optional[Turn]:
    """The assistant turn a client sends back after this answer (ids aside), or
    None if it cannot: a call's arguments that are not a JSON object."""
    blocks = [{"type": "text", "text": end.text}] if end.text else []
    for call in end.tool_calls:
        try:
            arguments = json.loads(call.arguments)
        except (ValueError, RecursionError):
            return None
        if not isinstance(arguments, dict):
            return None
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    return Turn("assistant", blocks)


RATE_LIMIT_RETRY_SECONDS = 60
OVERLOADED_RETRY_SECONDS = 10
# Anthropic's answer when it bills a request to the account's extra usage, lowercased:
# "Third-party apps now draw from your extra usage, not your plan limits. …"
EXTRA_USAGE_MESSAGE = "now draw from your extra usage"
LOGIN_HINT = "run `claude` in a terminal on this machine and log in (/login)"


class ReplayGuard:
    """Forwards each piece of text once, even when the CLI restarts a stream.

    A dropped upstream stream is retried by the CLI from the start
    (`abandoned_blocks`). Text already sent cannot be taken back, so the retry
    must repeat it; only what goes beyond it is new.
    """

    def __init__(self):
        self.sent: List[str] = []
        self.replay: Optional[str] = None  # after a restart: sent text the retry must repeat
        self.position = 0

    def restart(self):
        self.replay, self.position = "".join(self.sent), 0

    def feed(self, text: str) -> Optional[str]:
        """The part of `text` not sent yet; None if the retry departs from what was sent."""
        if self.replay is None:
            self.sent.append(text)
            return text
        expected = self.replay[self.position:self.position + len(text)]
        if not text.startswith(expected):
            return None
        self.position += len(expected)
        if self.position == len(self.replay):
            self.replay = None
        new = text[len(expected):]
        if new:
            self.sent.append(new)
        return new


class StopScanner:
    """Cuts text at the first stop sequence, holding back what may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, text: str) -> Tuple[str, Optional[str]]:
        """Return (text safe to emit, the stop sequence found, if one was)."""
        if not self.stops:
            return text, None
        buffer = self.held + text
        hits = [(i, stop) for i, stop in ((buffer.find(stop), stop) for stop in self.stops) if i >= 0]
        if hits:
            self.held = ""
            at, stop = min(hits)
            return buffer[:at], stop
        keep = next((n for n in range(min(len(buffer), max(map(len, self.stops)) - 1), 0, -1)
                     if any(stop.startswith(buffer[-n:]) for stop in self.stops)), 0)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


class TurnTranslator:
    """Turns one turn's stream-json events into TurnStart, TextDelta, ThinkingSignature,
    ToolCallDelta and TurnEnd.

    `live` means the text goes straight to a client and cannot be retracted;
    otherwise a restarted stream simply starts the answer over. `ended_by`
    is set when the proxy ends the turn itself: on a client stop sequence, on
    Claude's max_tokens stop (after which the CLI would ask Claude to go on,
    up to three more times), or once Claude has written its calls to the
    client's `tools` (which the client runs, not the CLI); the caller then
    ends the CLI's turn. A call to any other name is the CLI's business: it
    tells Claude there is no such tool. `structured` answers take their
    content from the CLI's StructuredOutput tool, and the text around it is
    not sent.

    With `hold_calls`, the turn ends for the client once Claude's message with
    its calls is complete, but not in the CLI: it waits there for the results.
    `cli_state` then says "holding"; it says "idle" after a turn the CLI ended
    as the client saw it, and None after anything else (a turn cut short, a
    structured answer). `counted` is the usage already reported for the CLI's
    turn, when this one goes on with it.
    """

    def __init__(self, stop: Sequence[str] = (), live: bool = True, clock=time.time,
                 tools: Sequence[str] = (), one_tool_call: bool = False, structured: bool = False,
                 hold_calls: bool = False, counted: Usage = Usage()):
        self.hold_calls = hold_calls
        self.counted = counted
        self.cli_state: Optional[str] = None
        self.live = live
        self.clock = clock
        self.stop_sequences = tuple(stop)
        self.tool_names = frozenset(tools)
        self.one_tool_call = one_tool_call
        self.structured = structured
        self.ended_by: Optional[str] = None  # "stop_sequence", "max_tokens" or "tool_use"
        self.stop_found: Optional[str] = None  # the client's stop sequence that ended the text
        self.stream_usage = Usage()
        self.streamed = False    # the current attempt arrives as stream events
        self.error_kind = None   # from the CLI's synthetic error message
        self.rate_limit: dict = {}
        self.retry_delay_ms: Optional[float] = None  # the CLI's last wait before a retry: upstream's retry-after
        self.thinking_muted = False
        self.started = False  # TurnStart is out
        self._start_answer()

    def _start_answer(self):
        self.content: List[str] = []
        self.reasoning: List[str] = []
        self.signature = ""
        self.calls: List[Tuple[str, str, List[str]]] = []  # (id, name, argument pieces)
        self.call_blocks: List[int] = []   # the content block of each call
        self.call_at: Dict[int, int] = {}  # content block → its call, while it is written
        self.guards = {False: ReplayGuard(), True: ReplayGuard()}
        self.scanner = StopScanner(self.stop_sequences)

    def feed(self, event: dict) -> list:
        kind = event.get("type")
        if kind == "stream_event":
            return self._stream_event(event.get("event") or {}, event)
        if kind == "assistant":
            return self._assistant(event)
        if kind == "rate_limit_event":
            self.rate_limit = event.get("rate_limit_info") or {}
        if kind == "system" and event.get("subtype") == "api_retry":
            self.retry_delay_ms = event.get("retry_delay_ms")
        if kind == "result":
            return self._result(event)
        return []

    def _stream_event(self, event: dict, line: dict) -> list:
        kind = event.get("type")
        index = event.get("index")
        if kind == "message_start":
            self.streamed = True
            self.stream_usage = Usage.from_claude((event.get("message") or {}).get("usage"))
            if not self.started:  # (a retry's message starts again)
                self.started = True
                return [TurnStart(self.stream_usage)]
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                return self._call_start(index, block)
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._text(delta.get("text") or "", reasoning=False)
            if delta.get("type") == "thinking_delta":
                return self._text(delta.get("thinking") or "", reasoning=True)
            if delta.get("type") == "input_json_delta":
                return self._call_arguments(index, delta.get("partial_json") or "")
            if delta.get("type") == "signature_delta":
                return self._signature(delta.get("signature") or "")
        elif kind == "content_block_stop":
            return self._call_stop(index)
        elif kind == "message_delta":
            self.stream_usage.output_tokens = (event.get("usage") or {}).get("output_tokens") \
                or self.stream_usage.output_tokens
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            if stop_reason == "max_tokens" and not self.ended_by:
                self.ended_by = "max_tokens"
                return self._content(self.scanner.flush())
            if stop_reason == "tool_use" and self.calls and not self.ended_by:
                self.ended_by = "tool_use"
        elif kind == "message_stop" and line.get("abandoned_blocks") and not self.ended_by:
            # (Our own interrupt abandons blocks too; that is no restart.)
            self._abandon((line["abandoned_blocks"] or {}).get("from_block_index") or 0)
        elif kind == "message_stop" and self.hold_calls and self.ended_by == "tool_use":
            self.cli_state = "holding"
            return [self._end("tool_use", self.stream_usage)]
        return []

    def _abandon(self, first_lost_block: int):
        """The upstream stream broke off; Claude's blocks from `first_lost_block` on are gone.

        Whole tool calls before it stand, and the CLI goes on to ask to run
        them. Otherwise it retries the call from the start.
        """
        self.streamed = False
        self.call_at.clear()
        kept = sum(block < first_lost_block for block in self.call_blocks)  # calls come in block order
        if kept < len(self.calls) and self.live:
            raise self._diverged()  # a call's id and arguments cannot be taken back
        if kept:
            del self.calls[kept:], self.call_blocks[kept:]
        elif not self.live:
            self._start_answer()
        else:
            for guard in self.guards.values():
                guard.restart()

    def _diverged(self) -> ApiError:
        return ApiError(502, "The upstream stream broke off and Claude's retry wrote a different "
                             "answer, so what was already sent is incomplete; retry the request.",
                        code="upstream_stream_restarted")

    def _assistant(self, event: dict) -> list:
        message = event.get("message") or {}
        if event.get("is_api_error_message") or message.get("model") == "<synthetic>":
            self.error_kind = event.get("error")  # never forwarded as model text
            return []
        if self.streamed:
            return []  # its text and calls already came as deltas
        # After a dropped stream the CLI may fall back to a non-streaming call:
        # then the answer arrives only as whole blocks.
        out = []
        for number, block in enumerate(message.get("content") or []):
            if block.get("type") == "text":
                out += self._text(block.get("text") or "", reasoning=False)
            elif block.get("type") == "thinking":
                out += self._text(block.get("thinking") or "", reasoning=True)
                out += self._signature(block.get("signature") or "")
            elif block.get("type") == "tool_use":
                out += self._call_start(number, block)
                out += self._call_arguments(number, json.dumps(block.get("input") or {}))
                out += self._call_stop(number)
        return out

    def _call_start(self, block_index: int, block: dict) -> list:
        if self.ended_by or block.get("name") not in self.tool_names:
            return []
        # Text held back for a stop sequence is complete: the call comes after it.
        out = self._content(self.scanner.flush())
        self.call_at[block_index] = len(self.calls)
        self.call_blocks.append(block_index)
        self.calls.append((block.get("id") or f"call_{uuid.uuid4().hex[:24]}", block["name"], []))
        return out + [ToolCallDelta(self.call_at[block_index], "", id=self.calls[-1][0], name=block["name"])]

    def _call_arguments(self, block_index: int, piece: str) -> list:
        if block_index not in self.call_at or not piece:
            return []
        index = self.call_at[block_index]
        self.calls[index][2].append(piece)
        return [ToolCallDelta(index, piece)]

    def _call_stop(self, block_index: int) -> list:
        if block_index not in self.call_at:
            return []
        pieces = self.calls[self.call_at[block_index]][2]
        out = [] if pieces else self._call_arguments(block_index, "{}")  # no arguments is still an object
        del self.call_at[block_index]
        if self.one_tool_call:
            self.ended_by = "tool_use"
        return out

    def _text(self, text: str, reasoning: bool) -> list:
        if self.structured and not reasoning:
            return []  # the answer is StructuredOutput's; this is talk around it
        new = self.guards[reasoning].feed(text)
        if new is None and not reasoning:
            raise self._diverged()
        if new is None:  # rewritten thinking: what was sent stays, the rest of it is not shown
            self.thinking_muted = True
        if self.ended_by or not new or (reasoning and self.thinking_muted):
            return []
        if reasoning:
            self.reasoning.append(new)
            return [TextDelta(new, reasoning=True)]
        new, self.stop_found = self.scanner.feed(new)
        if self.stop_found:
            self.ended_by = "stop_sequence"
        return self._content(new)

    def _signature(self, signature: str) -> list:
        if self.ended_by or self.thinking_muted or not signature or not self.reasoning:
            return []  # a seal on thinking the client did not get all of would be false
        self.signature = signature
        return [ThinkingSignature(signature)]

    def _content(self, text: str) -> list:
        if not text:
            return []
        self.content.append(text)
        return [TextDelta(text)]

    def _result(self, result: dict) -> list:
        if self.ended_by:  # we ended the turn; an interrupted turn's result may report no usage
            return [self._end(self.ended_by, self.stream_usage)]
        usage = Usage.from_claude(result.get("usage"))
        if not (usage.input_tokens or usage.output_tokens):
            usage = self.stream_usage
        else:  # the result counts the CLI's whole turn, which earlier requests may have begun
            usage -= self.counted
        if self.calls and result.get("terminal_reason") == "aborted_tools":
            # We refused the calls before we saw Claude's stop reason: its
            # message came whole (the non-streaming fallback) or broke off.
            return [self._end("tool_use", usage)]
        if result.get("is_error"):
            raise error_from_result(result, self.error_kind, self.rate_limit, self.clock(), self.retry_delay_ms)
        if self.structured:
            # The JSON the CLI checked against the schema; or, when Claude
            # answered in words twice, the words it took (PROTOCOL.md §6.4).
            checked = result.get("structured_output") is not None
            stop_reason = "end_turn" if checked else result.get("stop_reason")
            return self._content(result.get("result") or "") + [self._end(stop_reason, usage)]
        self.cli_state = "idle"
        return self._content(self.scanner.flush()) + [self._end(result.get("stop_reason"), usage)]

    def _end(self, stop_reason: Optional[str], usage: Usage) -> TurnEnd:
        calls = tuple(ToolCall(call_id, name, "".join(pieces)) for call_id, name, pieces in self.calls)
        return TurnEnd(stop_reason, usage, "".join(self.content), "".join(self.reasoning), calls,
                       stop_sequence=self.stop_found if stop_reason == "stop_sequence" else None,
                       signature=self.signature)


def error_from_result(result: dict, error_kind: Optional[str], rate_limit: dict, now: float,
                      retry_delay_ms: Optional[float] = None) -> ApiError:
    """Map a failed turn to the status a client can act on (PROTOCOL.md §1.2, §7).

    A 429's Retry-After is the window's reset time when the CLI saw one, else
    the wait the CLI itself kept before its last retry, which follows the
    upstream's retry-after."""
    status = result.get("api_error_status")
    terminal = result.get("terminal_reason")
    message = result.get("result") or "; ".join(result.get("errors") or []) \
        or f"Claude Code ended the turn with {result.get('subtype')}"
    lowered = str(message).lower()
    if terminal == "blocking_limit" or "prompt is too long" in lowered:
        return ApiError(400, f"The conversation is too long for the model: {message}",
                              code="context_length_exceeded")
    if status == 403:  # the CLI tags it authentication_failed too, but logging in again will not help
        return ApiError(403, str(message), code="permission_denied")
    if error_kind == "authentication_failed" or status == 401 or "not logged in" in lowered:
        return ApiError(503, f"Claude Code is not logged in or its login was rejected "
                             f"({message}): {LOGIN_HINT}.", code="claude_not_logged_in",
                        headers=[("x-should-retry", "false")])  # the SDKs would retry a 503 in vain
    if EXTRA_USAGE_MESSAGE in lowered:
        return ApiError(402, f"Anthropic bills this request to your account's extra usage, not your plan: "
                             f"{message} See 'Extra usage' in the README.", code="extra_usage_required")
    if error_kind == "rate_limit" or status == 429:
        resets_at = reset_time(rate_limit)
        if resets_at is not None and resets_at > now:
            wait = int(resets_at - now)
        elif isinstance(retry_delay_ms, (int, float)) and retry_delay_ms > 0:
            wait = round(retry_delay_ms / 1000)
        else:
            wait = RATE_LIMIT_RETRY_SECONDS
        return ApiError(429, f"Claude usage or rate limit reached: {message}", code="rate_limit_exceeded",
                              retry_after=max(wait, 1))
    if status == 529 or "overloaded" in lowered:
        return ApiError(503, f"Claude is overloaded: {message}", code="overloaded",
                              retry_after=OVERLOADED_RETRY_SECONDS)
    if terminal == "image_error" or status == 413:
        return ApiError(413, f"The request is too large for Claude: {message}", code="request_too_large")
    if error_kind == "model_not_found" or status == 404:
        return ApiError(404, str(message), code="model_not_found")
    if error_kind == "invalid_request" or status == 400:
        return ApiError(400, str(message), code="invalid_request")
    return ApiError(502, f"Claude Code reported an error: {message}", code="upstream_error")


# The subscription's windows, as the CLI reports them in a rate_limit_event
# (PROTOCOL.md §12): after a turn's message, and only when they changed, so
# the last one seen stands until another comes.
WINDOWS = {"five_hour": "5h", "seven_day": "7d"}  # the CLI's name → Anthropic's, in its header names
USAGE_HEADERS = ("anthropic-ratelimit-unified-status",
                 *(f"anthropic-ratelimit-unified-{short}-{part}" for short in WINDOWS.values()
                   for part in ("utilization", "reset", "status")))
STATUS_ORDER = ("allowed", "allowed_warning", "rejected")
LATEST_RESET = 10 ** 11  # Unix seconds, year 5138: a larger reset time is no time


class UsageWindows:
    """The latest rate_limit_event's info and when it was seen, shared by every CLI."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self._latest: Optional[Tuple[dict, float]] = None

    def seen(self, info: object):
        if isinstance(info, dict):
            with self._lock:
                self._latest = (info, self.clock())

    def latest(self) -> Optional[Tuple[dict, float]]:
        with self._lock:
            return self._latest


def reset_time(entry: dict) -> Optional[int]:
    """When a window (or the plan) resets, as the CLI reported it in Unix seconds; None if not plausibly one."""
    value = entry.get("resetsAt")
    return int(value) if type(value) in (int, float) and 0 < value < LATEST_RESET else None


def used_fraction(window: dict) -> Optional[float]:
    value = window.get("utilization")
    return value if type(value) in (int, float) and 0 <= value <= 100 else None


def overall_status(info: dict) -> str:
    """The worst status of the plan and its windows: a window's warning shows only in the window."""
    found = [info.get("status"), *(window.get("status") for window in known_windows(info).values())]
    return max((status for status in found if status in STATUS_ORDER), key=STATUS_ORDER.index, default="allowed")


def known_windows(info: dict) -> Dict[str, dict]:
    windows = info.get("unifiedWindows")
    return {name: window for name, window in (windows.items() if isinstance(windows, dict) else ())
            if name in WINDOWS and isinstance(window, dict)}


def usage_report(latest: Optional[Tuple[dict, float]], now: float, allow_extra_usage: bool) -> dict:
    """GET /v1/usage: each window's used fraction, reset time and status, and extra usage."""
    extra = {"allowed": allow_extra_usage, "in_use": None}
    if latest is None:
        return {"object": "usage", "windows": None, "extra_usage": extra,
                "reason": "Claude Code has not reported the subscription's windows yet: it does after a "
                          "request's answer, and never when it bills an API key."}
    info, seen_at = latest
    windows = {}
    for name, window in known_windows(info).items():
        resets_at = reset_time(window)
        passed = resets_at is not None and resets_at <= now
        windows[name] = {"used": None if passed else used_fraction(window),
                         "status": "reset" if passed else window.get("status") or "allowed",
                         "resets_at": None if resets_at is None else iso_time(resets_at),
                         "resets_in_seconds": None if resets_at is None else max(int(resets_at - now), 0)}
    extra.update(in_use=bool(info.get("isUsingOverage")), status=info.get("overageStatus"),
                 disabled_reason=info.get("overageDisabledReason"))
    return {"object": "usage", "status": overall_status(info), "windows": windows, "extra_usage": extra,
            "seen_at": iso_time(seen_at), "age_seconds": max(int(now - seen_at), 0)}


def usage_headers(latest: Optional[Tuple[dict, float]], now: float) -> List[Tuple[str, str]]:
    """The windows as Anthropic's own response headers, which tools already read; none that have reset."""
    if latest is None:
        return []
    info = latest[0]
    headers = [("anthropic-ratelimit-unified-status", overall_status(info))]
    for name, window in known_windows(info).items():
        resets_at, used = reset_time(window), used_fraction(window)
        if resets_at is not None and resets_at <= now:
            continue
        prefix = f"anthropic-ratelimit-unified-{WINDOWS[name]}"
        if used is not None:
            headers.append((f"{prefix}-utilization", f"{used:g}"))
        if resets_at is not None:
            headers.append((f"{prefix}-reset", str(resets_at)))
        if window.get("status") in STATUS_ORDER:
            headers.append((f"{prefix}-status", window["status"]))
    return headers


def extra_usage_refusal(latest: Optional[Tuple[dict, float]], now: float) -> Optional[ApiError]:
    """The error for a request while Anthropic bills extra usage, until the window that ran out resets."""
    info = latest[0] if latest else {}
    resets_at = reset_time(info)
    if not info.get("isUsingOverage") or resets_at is None or resets_at <= now:
        return None
    return ApiError(402, f"Your plan's {info.get('rateLimitType') or 'usage'} window is used up and Anthropic "
                         f"now bills requests to your account's extra usage; the proxy refuses them until the "
                         f"window resets at {iso_time(resets_at)}. Start it with --allow-extra-usage to go on.",
                    code="extra_usage_in_use", retry_after=max(int(resets_at - now), 1))


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ── 7. The OpenAI response: events → chat.completion(.chunk) / response dicts (pure)
# Both APIs' answers share one interface, so the server writes either the same
# way: start(begun) and feed(event) give a stream's frames (`begun` is the
# turn's TurnStart, or None if the stream opens before Claude's message began),
# sse(frame) encodes one, fail(err) ends a begun stream, and whole(end) is the
# non-streaming body. TurnStart and ThinkingSignature mean something to the
# Messages API alone.

# One encoder for every frame: json.dumps with an option builds a new one per call.
ENCODE_JSON = json.JSONEncoder(ensure_ascii=False).encode


def json_bytes(body: object) -> bytes:
    # "replace": a lone surrogate the client sent (and we echo) becomes "?", not an exception.
    return ENCODE_JSON(body).encode("utf-8", "replace")


FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls",
                  "refusal": "content_filter"}


def finish_reason(stop_reason: Optional[str]) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.prompt_tokens + usage.output_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}


@dataclass(frozen=True)
class Reply:
    """What every part of one response shares."""
    model: str
    include_usage: bool = False
    legacy_functions: bool = False  # function_call instead of tool_calls
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def finish_reason(self, end: TurnEnd) -> str:
        reason = finish_reason(end.stop_reason)
        return "function_call" if reason == "tool_calls" and self.legacy_functions else reason

    stream_end = b"data: [DONE]\n\n"
    keepalive = b": keep-alive\n\n"

    def start(self, begun: Optional[TurnStart] = None) -> List[dict]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def feed(self, event) -> List[dict]:
        if isinstance(event, TextDelta):
            return [self.delta_chunk(event)]
        if isinstance(event, ToolCallDelta):
            return [self.tool_call_chunk(event)]
        if isinstance(event, TurnEnd):
            return [self.finish_chunk(event), *([self.usage_chunk(event.usage)] if self.include_usage else [])]
        return []

    def fail(self, err: ApiError) -> List[dict]:
        return [err.body()]

    @staticmethod
    def sse(frame: dict) -> bytes:
        return b"data: " + json_bytes(frame) + b"\n\n"

    def whole(self, end: TurnEnd) -> dict:
        message = {"role": "assistant", "content": end.text or (None if end.tool_calls else ""),
                   "refusal": None}
        if end.reasoning:
            message["reasoning_content"] = end.reasoning
        if end.tool_calls and self.legacy_functions:
            first = end.tool_calls[0]
            message["function_call"] = {"name": first.name, "arguments": first.arguments}
        elif end.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in end.tool_calls]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": self.finish_reason(end)}],
                "usage": usage_body(end.usage)}

    def chunk(self, delta: dict, finish: Optional[str] = None) -> dict:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            body["usage"] = None
        return body

    def delta_chunk(self, delta: TextDelta) -> dict:
        return self.chunk({"reasoning_content" if delta.reasoning else "content": delta.text})

    def tool_call_chunk(self, delta: ToolCallDelta) -> dict:
        """OpenAI's shape: name and id on a call's first fragment, then arguments in pieces."""
        function = {"arguments": delta.arguments}
        if delta.name is not None:
            function = {"name": delta.name, **function}
        if self.legacy_functions:
            return self.chunk({"function_call": function})
        call = {"index": delta.index, "function": function}
        if delta.id is not None:
            call = {"index": delta.index, "id": delta.id, "type": "function", "function": function}
        return self.chunk({"tool_calls": [call]})

    def finish_chunk(self, end: TurnEnd) -> dict:
        return self.chunk({}, self.finish_reason(end))

    def usage_chunk(self, usage: Usage) -> dict:
        return dict(self.chunk({}), choices=[], usage=usage_body(usage))


# The Responses API's answer: items (reasoning, message, function calls) built
# as the turn's events arrive, each change also a streamed event.

INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def responses_usage(usage: Usage) -> dict:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cache_read_tokens,
                                     "cache_write_tokens": usage.cache_write_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.output_tokens}


def call_id_for(claude_id: str) -> str:
    """OpenAI's call_ form, which clients such as OpenClaw pass back unchanged."""
    return "call_" + re.sub(r"[^A-Za-z0-9]", "", claude_id.replace("toolu_", "", 1))


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """One Responses API response: feed() takes the turn's events and returns
    the stream events they make; `response` is the object as it stands.
    `echo` holds the request's settings that the object repeats.
    """

    def __init__(self, echo: dict, namespaces: Mapping[str, str] = ()):
        self.namespaces = dict(namespaces)
        self.response = {"id": _item_id("resp"), "object": "response", "created_at": int(time.time()),
                         "status": "in_progress", "error": None, "incomplete_details": None, **echo,
                         "output": [], "usage": None}
        self.sequence = 0
        self.open: Optional[dict] = None  # the item being written

    stream_end = b""  # no [DONE]: response.completed or response.failed ends the stream
    keepalive = b": keep-alive\n\n"

    @property
    def output(self) -> List[dict]:
        return self.response["output"]

    @staticmethod
    def sse(frame: dict) -> bytes:
        return b"event: " + frame["type"].encode() + b"\ndata: " + json_bytes(frame) + b"\n\n"

    def _event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def _snapshot(self) -> dict:
        return json.loads(json.dumps(self.response))

    def start(self, begun: Optional[TurnStart] = None) -> List[dict]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    def feed(self, event) -> List[dict]:
        if isinstance(event, TextDelta):
            return self._text(event.text, "reasoning" if event.reasoning else "message")
        if isinstance(event, ToolCallDelta) and event.id is not None:
            return self._close() + self._add({
                "id": _item_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": call_id_for(event.id), "name": event.name, "arguments": "",
                **({"namespace": self.namespaces[event.name]} if event.name in self.namespaces else {})})
        if isinstance(event, ToolCallDelta):
            self.open["arguments"] += event.arguments
            return [self._event("response.function_call_arguments.delta", item_id=self.open["id"],
                                output_index=len(self.output) - 1, delta=event.arguments)]
        if isinstance(event, TurnEnd):
            return self._end(event)
        return []

    def whole(self, end: TurnEnd) -> dict:
        """The response, from a finished turn (no stream: a retried attempt left no trace)."""
        events: list = [TextDelta(end.reasoning, reasoning=True)] if end.reasoning else []
        events += [TextDelta(end.text)] if end.text else []
        for index, call in enumerate(end.tool_calls):
            events += [ToolCallDelta(index, "", id=call.id, name=call.name), ToolCallDelta(index, call.arguments)]
        for event in [*events, end]:
            self.feed(event)
        return self.response

    def _add(self, item: dict) -> List[dict]:
        self.open = item
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))]

    def _text(self, text: str, kind: str) -> List[dict]:
        out = []
        if self.open is None or self.open["type"] != kind:
            out = self._close()
            if kind == "message":
                out += self._add({"id": _item_id("msg"), "type": "message", "status": "in_progress",
                                  "role": "assistant", "content": []})
                self.open["content"].append({"type": "output_text", "text": "", "annotations": []})
                out.append(self._part_event("response.content_part.added", part=dict(self.open["content"][0])))
            else:
                out += self._add({"id": _item_id("rs"), "type": "reasoning", "summary": []})
                self.open["summary"].append({"type": "summary_text", "text": ""})
                out.append(self._part_event("response.reasoning_summary_part.added",
                                            part=dict(self.open["summary"][0])))
        part = self._part()
        part["text"] += text
        kind_event = "response.output_text.delta" if kind == "message" else "response.reasoning_summary_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        return out + [self._part_event(kind_event, delta=text, **extra)]

    def _part(self) -> dict:
        return (self.open["content"] if self.open["type"] == "message" else self.open["summary"])[0]

    def _part_event(self, kind: str, **fields) -> dict:
        index = {"content_index": 0} if self.open["type"] == "message" else {"summary_index": 0}
        return self._event(kind, item_id=self.open["id"], output_index=len(self.output) - 1, **index, **fields)

    def _close(self, status: str = "completed") -> List[dict]:
        item, out = self.open, []
        if item is None:
            return out
        if item["type"] == "message":
            part = self._part()
            out += [self._part_event("response.output_text.done", text=part["text"], logprobs=[]),
                    self._part_event("response.content_part.done", part=dict(part))]
        elif item["type"] == "reasoning":
            part = self._part()
            out += [self._part_event("response.reasoning_summary_text.done", text=part["text"]),
                    self._part_event("response.reasoning_summary_part.done", part=dict(part))]
        else:
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=len(self.output) - 1, name=item["name"],
                                   arguments=item["arguments"]))
        if item["type"] != "reasoning":
            item["status"] = status
        self.open = None
        return out + [self._event("response.output_item.done", output_index=len(self.output) - 1,
                                  item=json.loads(json.dumps(item)))]

    def _end(self, end: TurnEnd) -> List[dict]:
        reason = INCOMPLETE_REASONS.get(finish_reason(end.stop_reason))
        out = self._close("incomplete" if reason else "completed")
        self.response["usage"] = responses_usage(end.usage)
        self.response["output_text"] = "".join(
            part["text"] for item in self.output if item["type"] == "message" for part in item["content"])
        if reason:
            self.response.update(status="incomplete", incomplete_details={"reason": reason})
            return out + [self._event("response.incomplete", response=self._snapshot())]
        self.response["status"] = "completed"
        return out + [self._event("response.completed", response=self._snapshot())]

    def fail(self, err: ApiError) -> List[dict]:
        # OpenAI's clients accept only its own codes here; ours goes in `type`.
        code = "rate_limit_exceeded" if err.status == 429 else "invalid_prompt" if err.status < 500 else "server_error"
        self.response.update(status="failed", error={"code": code, "message": err.message, "param": err.param,
                                                     "type": err.code or err.error_type})
        return [self._event("response.failed", response=self._snapshot())]

    def chat_messages(self) -> List[dict]:
        """The output as chat messages, for a later previous_response_id."""
        calls = [{"id": item["call_id"], "type": "function",
                  "function": {"name": item["name"], "arguments": item["arguments"]}}
                 for item in self.output if item["type"] == "function_call" and item["status"] == "completed"]
        message = {"role": "assistant", "content": self.response.get("output_text") or None}
        return [dict(message, tool_calls=calls) if calls else message]


# The Messages API's answer: Anthropic's message, its content blocks opened and
# closed as the turn's events arrive, each change a named stream event.

def messages_usage(usage: Usage) -> dict:
    return {"input_tokens": usage.input_tokens, "cache_creation_input_tokens": usage.cache_write_tokens,
            "cache_read_input_tokens": usage.cache_read_tokens, "output_tokens": usage.output_tokens}


class MessageBuilder:
    """One Messages API answer: feed() takes the turn's events and returns Anthropic's stream
    events; whole() is the message object. Thinking is shown only to a client that asked
    for it, as at Anthropic."""

    def __init__(self, model: str, shows_thinking: bool = False):
        self.model = model
        self.shows_thinking = shows_thinking
        self.id = f"msg_{uuid.uuid4().hex}"
        self.blocks = -1  # the index of the last block opened
        self.open: Optional[str] = None  # the kind of the block being written: text, thinking or tool_use
        self.call_blocks: Dict[int, int] = {}  # a tool call's index → its block

    stream_end = b""  # message_stop, or an error event, ends the stream
    keepalive = b'event: ping\ndata: {"type": "ping"}\n\n'

    @staticmethod
    def sse(frame: dict) -> bytes:
        return b"event: " + frame["type"].encode() + b"\ndata: " + json_bytes(frame) + b"\n\n"

    def start(self, begun: Optional[TurnStart] = None) -> List[dict]:
        # Claude's input so far, as at Anthropic; the turn's whole usage comes in message_delta.
        usage = begun.usage if begun else Usage()
        return [{"type": "message_start", "message": dict(self._message([], None), usage=messages_usage(usage))}]

    def feed(self, event) -> List[dict]:
        if isinstance(event, TextDelta):
            if event.reasoning and not self.shows_thinking:
                return []
            kind = "thinking" if event.reasoning else "text"
            opened = self._open(kind, {"type": "thinking", "thinking": "", "signature": ""} if event.reasoning
                                else {"type": "text", "text": ""})
            return [*opened, self._delta({"type": f"{kind}_delta", kind: event.text})]
        if isinstance(event, ThinkingSignature):
            return [self._delta({"type": "signature_delta", "signature": event.signature})] \
                if self.open == "thinking" else []
        if isinstance(event, ToolCallDelta):
            frames = []
            if event.id is not None:
                frames = self._open("tool_use", {"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
                self.call_blocks[event.index] = self.blocks
            if event.arguments:
                frames.append({"type": "content_block_delta", "index": self.call_blocks[event.index],
                               "delta": {"type": "input_json_delta", "partial_json": event.arguments}})
            return frames
        if isinstance(event, TurnEnd):
            return [*self._close(), {"type": "message_delta", "delta": self._ending(event),
                                     "usage": messages_usage(event.usage)},
                    {"type": "message_stop"}]
        return []

    def fail(self, err: ApiError) -> List[dict]:
        return [err.anthropic_body()]

    def whole(self, end: TurnEnd) -> dict:
        content = []
        if end.reasoning and self.shows_thinking:
            content.append({"type": "thinking", "thinking": end.reasoning, "signature": end.signature})
        if end.text:
            content.append({"type": "text", "text": end.text})
        content += [{"type": "tool_use", "id": call.id, "name": call.name, "input": call_input(call)}
                    for call in end.tool_calls]
        return dict(self._message(content, end), usage=messages_usage(end.usage))

    def _message(self, content: list, end: Optional[TurnEnd]) -> dict:
        ending = self._ending(end) if end else {"stop_reason": None, "stop_sequence": None}
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                **ending}

    @staticmethod
    def _ending(end: TurnEnd) -> dict:
        return {"stop_reason": end.stop_reason or "end_turn", "stop_sequence": end.stop_sequence}

    def _open(self, kind: str, block: dict) -> List[dict]:
        if self.open == kind and kind != "tool_use":
            return []
        frames = self._close()
        self.blocks += 1
        self.open = kind
        return [*frames, {"type": "content_block_start", "index": self.blocks, "content_block": block}]

    def _close(self) -> List[dict]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.blocks}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.blocks, "delta": delta}


def call_input(call: ToolCall) -> dict:
    """A call's arguments as the object Anthropic's tool_use block holds."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except (ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(502, f"Claude's call to {call.name} has arguments that are not a JSON object.",
                       code="cli_bad_output")
    return arguments


# ── 8. The HTTP server: routes, admission, stored responses, SSE (I/O) ─────

MAX_BODY_BYTES = 32 * 1024 * 1024  # Anthropic's own request limit
MAX_REQUEST_LINE = 8192            # bytes; http.server's own limits bound each header line and their count
BLANK_LINES_SKIPPED = 8            # before a request line, as RFC 9112 asks a server to allow
IDLE_SECONDS = 300                 # an idle keep-alive connection is closed after this long
LINGER_SECONDS = 1                 # reading what a client still sends after its last answer, before closing
LINGER_BYTES = 1024 * 1024
WRITE_GRACE_SECONDS = 1            # a write past the request's --timeout may still take this long: its error
QUEUE_LENGTH = 8                   # requests that may wait for a free CLI slot
QUEUE_WAIT_SECONDS = 10
CLIENT_CHECK_SECONDS = 0.05        # how often a queued request looks whether its client is still there
BUSY_RETRY_SECONDS = 5
SHUTDOWN_GRACE_SECONDS = 5
KEEPALIVE_SECONDS = 10             # silence before a `: keep-alive` comment
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PEER_CLOSED = getattr(select, "POLLRDHUP", 0)  # Linux only
REQUEST_TARGET = re.compile(r"[!-~]+")  # visible ASCII: RFC 9112 has no room for spaces, controls or bytes above
HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]{1,5})?")  # name or [IPv6], then a port
HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
# Each route, as written without its /v1 (which is optional), and its methods.
ROUTES = {"/": ("GET",), "/health": ("GET",), "/metrics": ("GET",), "/v1/status": ("GET",), "/v1/usage": ("GET",),
          "/v1/models": ("GET",), "/v1/models/{id}": ("GET",),
          "/v1/chat/completions": ("POST",), "/v1/responses": ("POST",), "/v1/responses/{id}": ("GET", "DELETE"),
          "/v1/messages": ("POST",), "/v1/messages/count_tokens": ("POST",)}
METHODS = (*dict.fromkeys(method for methods in ROUTES.values() for method in methods), "OPTIONS")
COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/messages")  # their answers carry the usage windows
MESSAGES_ROOTS = ("/v1/messages", "/messages")  # the Messages API's paths, and any under them
STORED_RESPONSES = 1000            # responses kept for previous_response_id, at most
STORED_BYTES = 256 * 1024 * 1024   # of request bodies, at most
STORED_SECONDS = 3600              # for this long each


# GET / : a status page for people, self-contained so that it works offline. It
# holds no data: its script reads /v1/status with the key the user types in,
# kept in the tab's sessionStorage, never in a URL. Its text comes from the
# proxy and its clients, so the script sets text, never markup.
STATUS_SCRIPT = r"""
"use strict";
const REFRESH_MS = 5000;
const WINDOW_NAMES = {five_hour: "5-hour window", seven_day: "7-day window"};
const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const node = document.createElement(tag);  // text, never markup: model names come from clients
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function duration(seconds) {
  const hours = Math.floor(seconds / 3600), minutes = Math.floor(seconds % 3600 / 60);
  return hours >= 24 ? `${Math.floor(hours / 24)} d ${hours % 24} h` : hours ? `${hours} h ${minutes} min` : `${minutes} min`;
}

function showWindows(usage) {
  const box = $("windows");
  box.replaceChildren();
  if (!usage || !usage.windows) {
    box.append(element("div", usage ? usage.reason : "", "muted"));
    return;
  }
  for (const [name, window] of Object.entries(usage.windows)) {
    const row = element("div", undefined, "window");
    row.dataset.window = name;
    const label = element("div", undefined, "label");
    const used = window.used === null ? "reset" : `${Math.round(window.used * 100)} % used`;
    label.append(element("span", `${WINDOW_NAMES[name] || name}: ${used} (${window.status})`));
    label.append(element("span", window.resets_at ?
      `resets ${new Date(window.resets_at).toLocaleString()} (in ${duration(window.resets_in_seconds)})` : "", "muted"));
    const bar = element("div", undefined, "bar"), fill = element("div", undefined, `fill ${window.status}`);
    fill.style.width = `${Math.min(window.used || 0, 1) * 100}%`;
    bar.append(fill);
    row.append(label, bar);
    box.append(row);
  }
  const extra = usage.extra_usage;
  box.append(element("div", `Extra usage: ${extra.in_use ? "in use" : "not in use"}; the proxy ` +
    `${extra.allowed ? "allows it" : "refuses requests while it is in use"}. Reported ${duration(usage.age_seconds)} ago.`,
    extra.in_use ? "bad" : "muted"));
}

function showFacts(status) {
  const facts = [["Claude Code", status.claude_version], ["requests running", status.in_flight],
                 ["queued", status.queued]];
  for (const state of ["running", "live", "held", "spare"]) facts.push([`CLIs ${state}`, status.processes[state]]);
  facts.push(["CLI budget", status.processes.limit]);
  $("facts").replaceChildren(...facts.map(([name, value]) => {
    const fact = element("div", name, "fact muted");
    fact.prepend(element("b", String(value)));
    return fact;
  }));
}

function showRequests(requests) {
  $("requests").replaceChildren(...requests.slice().reverse().map((request) => {
    const row = element("tr");
    row.append(element("td", new Date(request.time).toLocaleTimeString()), element("td", request.endpoint),
               element("td", request.model), element("td", String(request.status), request.status >= 400 ? "bad" : ""),
               element("td", request.tokens, "num"), element("td", `${request.duration.toFixed(2)} s`, "num"),
               element("td", request.served));
    return row;
  }));
  if (!requests.length) {
    const row = element("tr");
    row.append(element("td", "None yet.", "muted"));
    $("requests").append(row);
  }
}

async function refresh() {
  const key = sessionStorage.getItem("claude-max-proxy-key");
  let reply;
  try {
    reply = await fetch("/v1/status", {cache: "no-store", headers: key ? {Authorization: `Bearer ${key}`} : {}});
  } catch (error) {
    $("summary").textContent = `The proxy does not answer (${error.message}); trying again.`;
    return;
  }
  if (reply.status === 401) {
    $("login").hidden = false;
    $("status").hidden = true;
    $("key-error").hidden = !key;
    $("summary").textContent = "";
    return;
  }
  if (!reply.ok) {
    $("summary").textContent = `The proxy answered ${reply.status}; trying again.`;
    return;
  }
  const status = await reply.json();
  $("login").hidden = true;
  $("status").hidden = false;
  $("summary").textContent = `Claude Code ${status.claude_version}, updated ${new Date().toLocaleTimeString()}`;
  showWindows(status.usage);
  showFacts(status);
  showRequests(status.recent);
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("claude-max-proxy-key", $("key").value);
  $("key").value = "";
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
"""
STATUS_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>claude-max-proxy</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1f2328; background: #f6f8fa; }
  main { max-width: 960px; margin: 0 auto; padding: 24px; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 15px; margin: 24px 0 8px; }
  .muted { color: #656d76; }
  .card { background: #fff; border: 1px solid #d0d7de; border-radius: 8px; padding: 16px; }
  .window { margin: 8px 0 14px; }
  .window .label { display: flex; justify-content: space-between; }
  .bar { height: 14px; background: #eaeef2; border-radius: 7px; overflow: hidden; margin-top: 4px; }
  .fill { height: 100%; background: #1f883d; width: 0; }
  .fill.allowed_warning { background: #bf8700; }
  .fill.rejected { background: #cf222e; }
  .facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); gap: 12px; }
  .fact b { display: block; font-size: 20px; color: #1f2328; }
  table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eaeef2; white-space: nowrap; }
  td.num, th.num { text-align: right; }
  .bad { color: #cf222e; }
  form { display: flex; gap: 8px; }
  input { flex: 1; padding: 6px 8px; font: inherit; }
  button { padding: 6px 12px; font: inherit; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<main>
  <h1>claude-max-proxy</h1>
  <div class="muted" id="summary">Loading…</div>
  <section id="login" class="card" hidden>
    <p>This proxy needs its API key (<code>--api-key</code>). It stays in this tab only.</p>
    <form id="key-form"><input id="key" type="password" autocomplete="off" placeholder="API key">
      <button>Show status</button></form>
    <p class="bad" id="key-error" hidden>That key was refused.</p>
  </section>
  <section id="status" hidden>
    <h2>Subscription windows</h2>
    <div class="card" id="windows"></div>
    <h2>Now</h2>
    <div class="card facts" id="facts"></div>
    <h2>Last requests</h2>
    <div class="card"><table>
      <thead><tr><th>time</th><th>endpoint</th><th>model</th><th>status</th><th class="num">tokens</th>
        <th class="num">duration</th><th>served</th></tr></thead>
      <tbody id="requests"></tbody>
    </table></div>
  </section>
</main>
<script>""" + STATUS_SCRIPT + r"""</script>
</body>
</html>
"""
# The script is allowed by its hash: no other script, style source or connection runs in the page.
STATUS_PAGE_POLICY = (f"default-src 'none'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                      f"form-action 'none'; frame-ancestors 'none'; script-src 'sha256-"
                      f"{base64.b64encode(hashlib.sha256(STATUS_SCRIPT.encode()).digest()).decode()}'")
RECENT_REQUESTS = 20  # completion requests the status page lists


def shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down.", code="shutting_down")


def turn_end(events: Iterator) -> TurnEnd:
    """The turn's end, read without waiting for its CLI to stop: that happens after the reply."""
    return next(event for event in events if isinstance(event, TurnEnd))


class AdmissionGate:
    """Lets `limit` requests run; a few more wait briefly; the rest get 429.
    A waiting request whose client leaves gives up its place at once."""

    def __init__(self, limit: int, queue_length: int, wait: float):
        self.limit, self.queue_length, self.wait = limit, queue_length, wait
        self.running = self.waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, client_gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
        with self._cond:
            if self.running >= self.limit:
                if self.waiting >= self.queue_length:
                    raise self._busy()
                self.waiting += 1
                try:
                    deadline = time.monotonic() + self.wait
                    while self.running >= self.limit:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self._busy()
                        self._cond.wait(min(left, CLIENT_CHECK_SECONDS))
                        if client_gone():
                            raise ClientGone()
                finally:
                    self.waiting -= 1
            self.running += 1
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self._cond.notify_all()

    def _busy(self) -> ApiError:
        return ApiError(429, f"All {self.limit} Claude slots are busy; retry shortly "
                             "(or raise --max-concurrency).", code="server_busy",
                        retry_after=BUSY_RETRY_SECONDS)


class ResponseStore:
    """Recent Responses API responses, so a client may send only what is new.

    Each keeps its whole conversation as chat messages, so a chain does not
    depend on the responses before it. A response that follows another shares
    that one's message objects: a chain costs its messages once, and the
    budget counts each request's own body.
    """

    def __init__(self, limit: int = STORED_RESPONSES, max_bytes: int = STORED_BYTES,
                 seconds: float = STORED_SECONDS, clock=time.monotonic):
        self.limit, self.max_bytes, self.seconds, self.clock = limit, max_bytes, seconds, clock
        self._items: "OrderedDict[str, Tuple[float, dict, List[dict], int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict, conversation: List[dict], size: int):
        with self._lock:
            self._items[response["id"]] = (self.clock(), response, conversation, size)
            self._bytes += size
            self._forget(lambda: len(self._items) > self.limit or self._bytes > self.max_bytes)

    def get(self, response_id: str) -> dict:
        return self._find(response_id)[1]

    def conversation(self, response_id: str) -> List[dict]:
        """The chat messages of the conversation that ends with this response."""
        return self._find(response_id, param="previous_response_id")[2]

    def delete(self, response_id: str):
        self._find(response_id)
        with self._lock:
            forgotten = self._items.pop(response_id, None)
            self._bytes -= forgotten[3] if forgotten else 0

    def _find(self, response_id: str, param: Optional[str] = None) -> tuple:
        with self._lock:
            self._forget(lambda: False)
            found = self._items.get(response_id)
        if found is None:
            raise ApiError(404, f"No stored response with id '{response_id}': this proxy keeps the last "
                                f"{self.limit} responses for {self.seconds / 60:g} minutes, in memory.",
                           code="response_not_found", param=param)
        return found

    def _forget(self, too_many):
        """Drop the oldest responses while they are too old or `too_many()`."""
        while self._items and (too_many() or self.clock() - next(iter(self._items.values()))[0] > self.seconds):
            self._bytes -= self._items.popitem(last=False)[1][3]


def is_messages_path(path: str) -> bool:
    """Whether an Anthropic client sent this: its answer, an error too, is in Anthropic's shapes."""
    path = path.rstrip("/")
    return any(path == root or path.startswith(root + "/") for root in MESSAGES_ROOTS)


def match_route(path: str) -> Tuple[Optional[str], str]:
    """The ROUTES entry a request path is for (None if none), and the {id} in it, decoded."""
    if not path.startswith("/"):  # a target of only a query, or a URL without a path
        return None, ""
    path = path.rstrip("/") or "/"
    for route in ROUTES:
        for form in (route, route[len("/v1"):]) if route.startswith("/v1/") else (route, "/v1" + route):
            prefix, is_template, _ = form.partition("{id}")
            if path == form or is_template and path.startswith(prefix) and len(path) > len(prefix):
                return route, unquote(path[len(prefix):]) if is_template else ""
    return None, ""


def host_allowed(host_header: Optional[str], config: Config) -> bool:
    """Refuse DNS rebinding: on loopback, only loopback names (and --allowed-host), read strictly,
    so that `localhost:3456@evil.example` is not taken for localhost."""
    if not is_loopback(config.host) or not host_header:
        return True
    host = HOST_HEADER.fullmatch(host_header.strip())
    if host is None:
        return False
    name = host[1].strip("[]").lower()
    return is_loopback(name) or name in config.allowed_hosts


def one_line(text: str, limit: int = 200) -> str:
    """Client-given text as the log may show it: escaped, on one line, and short."""
    return json.dumps(text)[1:-1][:limit]


class ClientReads(io.RawIOBase):
    """A connection's bytes, read so that each phase a client controls ends on time.

    A socket timeout bounds each read, not a phase: a client sending its
    headers a byte every 20 seconds would never be cut off. Each read here
    is given only the time left in its phase, and raises socket.timeout
    when there is none.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: Optional[float] = None  # of the phase under way; None while idle between requests

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = IDLE_SECONDS if self.deadline is None else self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)

    def phase(self, seconds: Optional[float]):
        """From now, reads must be done within `seconds`; None: idle, waiting for the next request."""
        self.deadline = None if seconds is None else time.monotonic() + seconds


# What GET /metrics shows, in Prometheus's text format: counted as each
# request ends, and read with the pool's and the windows' state of the moment.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MODEL_LABELS = 20  # distinct models counted by name; any more are counted as "other"
METRIC_PREFIX = "claude_max_proxy_"
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")


class Histogram:
    def __init__(self):
        self.buckets = [0] * len(LATENCY_BUCKETS)  # cumulative, as Prometheus counts them
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float):
        for number, bound in enumerate(LATENCY_BUCKETS):
            self.buckets[number] += seconds <= bound
        self.sum += seconds
        self.count += 1


class Metrics:
    """The counters and histograms of answered requests; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, str, str], int] = {}  # (endpoint, model, status) → count
        self.duration: Dict[str, Histogram] = {}             # endpoint → request durations
        self.first_token: Dict[str, Histogram] = {}          # endpoint → time to a stream's first delta
        self.tokens = dict.fromkeys(TOKEN_KINDS, 0)
        self.turns = dict.fromkeys(("cold", "warm", "continued"), 0)

    def request_done(self, endpoint: str, model: str, status: int, seconds: float,
                     first_token: Optional[float], usage: Optional[Usage], served: str):
        with self._lock:
            models = {key[1] for key in self.requests}
            if model not in models and len(models) >= MODEL_LABELS:
                model = "other"
            key = (endpoint, model, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.duration.setdefault(endpoint, Histogram()).observe(seconds)
            if first_token is not None:
                self.first_token.setdefault(endpoint, Histogram()).observe(first_token)
            if usage:
                counts = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens)
                for kind, count in zip(TOKEN_KINDS, counts):
                    self.tokens[kind] += count
            if served in self.turns:
                self.turns[served] += 1

    def render(self, processes: dict, cli_starts: int, in_flight: int, queued: int,
               latest: Optional[Tuple[dict, float]], now: float) -> str:
        out = MetricsText()
        with self._lock:
            out.family("requests_total", "counter", "Requests answered, by endpoint, model and HTTP status.")
            for (endpoint, model, status), count in sorted(self.requests.items()):
                out.sample("requests_total", count, endpoint=endpoint, model=model, status=status)
            out.histogram("request_duration_seconds", "From a request's first byte to its answer's end.",
                          self.duration)
            out.histogram("time_to_first_token_seconds", "From a streamed request's first byte to its first delta.",
                          self.first_token)
            out.family("tokens_total", "counter", "Tokens of answered turns, as Anthropic counted them.")
            for kind, count in self.tokens.items():
                out.sample("tokens_total", count, kind=kind)
            out.family("turns_total", "counter", "Turns by the CLI that ran them: started for the request "
                                                "(cold), a spare (warm), or the conversation's own (continued).")
            for served, count in self.turns.items():
                out.sample("turns_total", count, served=served)
        out.family("cli_processes", "gauge", "CLI processes alive, by state.")
        for state in ("running", "live", "held", "spare"):
            out.sample("cli_processes", processes[state], state=state)
        out.gauge("cli_processes_limit", "CLI processes allowed at once (--max-processes).", processes["limit"])
        out.family("cli_starts_total", "counter", "CLI processes started.")
        out.sample("cli_starts_total", cli_starts)
        out.gauge("requests_in_flight", "Requests running a turn.", in_flight)
        out.gauge("requests_queued", "Requests waiting for a free slot.", queued)
        if latest is not None:
            info, seen_at = latest
            windows = known_windows(info)
            out.family("usage_window_utilization", "gauge", "The fraction of each subscription window used.")
            for name, window in windows.items():
                if used_fraction(window) is not None:
                    out.sample("usage_window_utilization", used_fraction(window), window=name)
            out.family("usage_window_reset_timestamp_seconds", "gauge", "When each subscription window resets.")
            for name, window in windows.items():
                if reset_time(window) is not None:
                    out.sample("usage_window_reset_timestamp_seconds", reset_time(window), window=name)
            out.gauge("usage_report_age_seconds", "How long ago the CLI last reported the windows.", now - seen_at)
            out.gauge("extra_usage_in_use", "1 while Anthropic bills requests to the account's extra usage.",
                      int(bool(info.get("isUsingOverage"))))
        return out.text()


class MetricsText:
    """Prometheus's text exposition format, written family by family."""

    def __init__(self):
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str):
        self.lines += [f"# HELP {METRIC_PREFIX}{name} {help_text}", f"# TYPE {METRIC_PREFIX}{name} {kind}"]

    def sample(self, name: str, value: float, **labels: str):
        escaped = (str(text).replace("\\", r"\\").replace('"', r'\"').replace("\n", r"\n")
                   for text in labels.values())
        label_text = ",".join(f'{key}="{value}"' for key, value in zip(labels, escaped))
        self.lines.append(f"{METRIC_PREFIX}{name}{{{label_text}}} {value!r}" if label_text
                          else f"{METRIC_PREFIX}{name} {value!r}")

    def gauge(self, name: str, help_text: str, value: float):
        self.family(name, "gauge", help_text)
        self.sample(name, value)

    def histogram(self, name: str, help_text: str, by_endpoint: Dict[str, Histogram]):
        self.family(name, "histogram", help_text)
        for endpoint, histogram in sorted(by_endpoint.items()):
            for bound, count in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), (*histogram.buckets, histogram.count)):
                self.sample(f"{name}_bucket", count, endpoint=endpoint, le=bound)
            self.sample(f"{name}_sum", histogram.sum, endpoint=endpoint)
            self.sample(f"{name}_count", histogram.count, endpoint=endpoint)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 resets clients that connect together, as agents' tool calls do

    def __init__(self, config: Config, cli_version: str):
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        super().__init__((config.host.strip("[]"), config.port), ProxyHandler)
        self.config = config
        self.cli_version = cli_version
        self.gate = AdmissionGate(config.max_concurrency, QUEUE_LENGTH, QUEUE_WAIT_SECONDS)
        self.stored = ResponseStore()
        self.stopping = threading.Event()
        self.windows = UsageWindows()
        self.metrics = Metrics()
        self.recent: deque = deque(maxlen=RECENT_REQUESTS)  # the status page's last requests, oldest first
        self.pool = ProcessPool(config, self.stopping, self.windows)
        # Requests under way: from a connection's accept, or a kept-alive one's next first byte, to
        # the request's log line. Shutdown waits for them: none is cut off unanswered.
        self._handling = 0
        self._handling_done = threading.Condition()

    def request_began(self):
        with self._handling_done:
            self._handling += 1

    def request_ended(self):
        with self._handling_done:
            self._handling -= 1
            self._handling_done.notify_all()

    def process_request(self, request, client_address):
        self.request_began()  # the connection's first request, before its thread runs
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        """Close a connection without losing its last answer: bytes left unread at close() make the
        kernel reset the connection, and a reset can reach the client before it has read the answer
        (a refused body, pipelined requests). So end our side, and read what still comes, briefly."""
        try:
            request.shutdown(socket.SHUT_WR)
            deadline, drained = time.monotonic() + LINGER_SECONDS, 0
            while drained < LINGER_BYTES and time.monotonic() < deadline:
                request.settimeout(deadline - time.monotonic())
                data = request.recv(65536)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass
        self.close_request(request)

    def handle_error(self, request, client_address):
        # A request's own errors are answered and logged by its handler: what comes here is a bug.
        log.exception("internal error on a connection from %s", client_address[0])

    def server_bind(self):
        # HTTPServer.server_bind would look up the host's FQDN: a DNS query at every start.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def drain_and_close(self):
        """Stop serving: requests in flight get a grace period, then every child is stopped. Until
        then serve_forever() goes on accepting, so that a request that came just now gets a 503,
        not a reset."""
        self.stopping.set()
        self.pool.close()
        if not self._wait_handled(SHUTDOWN_GRACE_SECONDS):
            log.warning("stopping %d unfinished request(s)", len(self.pool.running()))
        stopping = [threading.Thread(target=process.close, name="cli-stop") for process in self.pool.running()]
        for thread in stopping:  # together: each may take its EXIT_GRACE_SECONDS
            thread.start()
        for thread in stopping:
            thread.join()
        self._wait_handled(SHUTDOWN_GRACE_SECONDS)  # they answer 503 and end
        self.shutdown()
        self.server_close()

    def _wait_handled(self, timeout: float) -> bool:
        with self._handling_done:
            return self._handling_done.wait_for(lambda: self._handling == 0, timeout)


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"claude-max-proxy/{__version__}"
    server: ProxyServer

    # ── reading: the one place a request's head is taken in and checked ──
    def setup(self):
        super().setup()
        self.reads = ClientReads(self.connection)
        self.rfile = io.BufferedReader(self.reads)

    def handle(self):
        self.kept_alive = False
        super().handle()

    def handle_one_request(self):
        """Read one request and answer it. Whatever arrives gets an HTTP answer; one that cannot be
        read as HTTP also ends the connection, which can no longer be trusted to frame the next."""
        counted, self.kept_alive = not self.kept_alive, True  # a first request counts from its accept
        try:
            if not self.next_request_comes():
                self.close_connection = True
                return
            if not counted:
                self.server.request_began()
                counted = True
            self.serve_one_request()
        finally:
            if counted:
                self.server.request_ended()

    def next_request_comes(self) -> bool:
        """Wait, idle, for a request's first byte; False if the connection closed or idled out first."""
        self.reads.phase(None)
        try:
            return bool(self.rfile.peek(1))
        except OSError:  # socket.timeout too
            return False

    def serve_one_request(self):
        self.command, self.requestline, self.path, self.route_path, self.headers = "", "", "", "", None
        self.endpoint, self.endpoint_item = None, ""  # the path's ROUTES entry and its {id}, once read
        self.messages_api = False  # the path is the Messages API's, or under it: Anthropic's shapes
        self.request_version, self.declared_length = self.protocol_version, None
        try:
            if not self.read_head():
                self.close_connection = True  # it left in the middle of its head: nothing to answer
                return
        except ApiError as err:
            self.begin_request()
            self.close_connection = True
            self.request_version = self.protocol_version  # whatever the request line said, answer in HTTP/1.1
            self.send_api_error(err)
            self.request_finished()
            return
        self.handle_method()

    def read_head(self) -> bool:
        """Read the request line and headers, within --read-timeout of their first byte, which has come;
        False if the client left in the middle of them."""
        try:
            self.reads.phase(self.server.config.read_timeout)
            for _ in range(BLANK_LINES_SKIPPED):
                self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
                if self.raw_requestline not in (b"\r\n", b"\n"):
                    break
            if not self.raw_requestline.endswith(b"\n"):
                if len(self.raw_requestline) > MAX_REQUEST_LINE:
                    raise ApiError(414, f"The request line is over {MAX_REQUEST_LINE} bytes.",
                                   code="request_line_too_long")
                return False  # the client left in the middle of it
            self.parse_request()  # its errors come back through send_error, raised
        except socket.timeout:
            raise ApiError(408, "The request's headers did not arrive within --read-timeout "
                                f"({self.server.config.read_timeout:g} s).", code="request_timeout") from None
        except OSError:
            return False
        self.check_head()
        return True

    def check_head(self):
        """What http.server lets through and this server cannot answer, or frame the next request after."""
        if self.request_version == "HTTP/0.9":
            raise ApiError(505, "HTTP/0.9 is not supported; send HTTP/1.1.", code="http_version_not_supported")
        if not hasattr(self, "do_" + self.command):
            raise ApiError(405, f"{self.command} is not supported; use {', '.join(METHODS)}.",
                           code="method_not_allowed", headers=[("Allow", ", ".join(METHODS))])
        if not REQUEST_TARGET.fullmatch(self.path):
            raise ApiError(400, "The request target has spaces, control characters or non-ASCII bytes; "
                                "percent-encode them.", code="invalid_request_target")
        try:
            self.route_path = urlsplit(self.path).path
            self.endpoint, self.endpoint_item = match_route(self.route_path)
            self.messages_api = is_messages_path(self.route_path)
        except ValueError as exc:
            raise ApiError(400, f"Invalid request target: {exc}.", code="invalid_request_target") from None
        if len(self.headers.get_all("Host") or ()) > 1:
            raise ApiError(400, "More than one Host header.", code="invalid_request")
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "Send the JSON body with a Content-Length header (chunked request "
                                "bodies are not supported).", code="length_required")
        lengths = {length.strip() for length in self.headers.get_all("Content-Length") or ()}
        if lengths:
            declared = lengths.pop()
            if lengths or not declared.isdigit() or not declared.isascii():
                raise ApiError(400, "Invalid Content-Length header.", code="invalid_request")
            self.declared_length = int(declared) if len(declared) <= 10 else MAX_BODY_BYTES + 1
            if self.declared_length > MAX_BODY_BYTES:
                raise ApiError(413, f"The request body is over the limit of {MAX_BODY_BYTES} bytes.",
                               code="request_too_large")
            if self.declared_length and self.command != "POST":
                self.close_connection = True  # no route reads it: it must not be taken for the next request

    def send_error(self, code, message=None, explain=None):
        """http.server's own findings (a bad request line or version, headers too long), as ApiError."""
        raise ApiError(code, message or self.responses.get(code, ("Bad request",))[0] + ".",
                       code="http_version_not_supported" if code == 505 else "bad_request")

    # ── dispatch ──
    def do_GET(self):
        self.handle_method()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def begin_request(self):
        """Reset the per-request state: one connection carries many requests."""
        self.started = time.monotonic()
        self.sse_started = self.body_read = False
        self.unsent: List[bytes] = []  # SSE frames made and not yet sent
        self.last_sent = self.started
        self.body_length = 0
        self.reply: Union[Reply, ResponseBuilder, None] = None  # the answer being written
        self.log_model = "-"
        self.log_usage: Optional[Usage] = None
        self.log_served = "-"  # how a turn got its CLI: cold, warm or continued
        self.first_token: Optional[float] = None  # seconds from the start to a stream's first delta
        self.turn_start: Optional[TurnStart] = None  # once Claude's message has begun
        self.status = 0
        given_id = self.headers.get("x-request-id", "") if self.headers is not None else ""
        self.request_id = given_id if REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex

    def handle_method(self):
        self.begin_request()
        try:
            self.route()
        except ApiError as err:
            self.send_api_error(err)
        except ClientGone:
            self.status, self.close_connection = 499, True
        except Exception:
            self.send_api_error(ApiError(500, "Internal error in claude-max-proxy; see its log.",
                                         code="internal_error"))
            raise
        finally:
            self.request_finished()

    def route(self):
        route, item = self.endpoint, self.endpoint_item
        if not host_allowed(self.headers.get("Host"), self.server.config):
            raise ApiError(403, f"Host '{self.headers.get('Host')}' is not allowed; start the proxy "
                                "with --allowed-host NAME to accept it.", code="host_not_allowed")
        self.check_origin()
        if self.command == "OPTIONS":
            return self.send_preflight()
        if self.server.stopping.is_set():
            self.close_connection = True
            raise shutting_down()
        if route not in ("/health", "/"):  # the page has no data; it asks for the key itself
            self.check_api_key()
        if route is None:
            routes = ", ".join(f"{'/'.join(methods)} {route}" for route, methods in ROUTES.items())
            raise ApiError(404, f"Unknown route {self.command} {self.route_path}; this server has {routes}.",
                           code="unknown_route")
        if self.command not in ROUTES[route]:
            allowed = ", ".join(ROUTES[route])
            raise ApiError(405, f"{self.command} is not allowed on {self.route_path}; use {allowed}.",
                           code="method_not_allowed", headers=[("Allow", allowed)])
        if route == "/health":
            # A monitor needs no key; the subscription's use is the key holder's to see.
            self.send_json(200, {"status": "ok", **self.server_state(),
                                 "usage": self.usage_report() if self.key_given() else None})
        elif route == "/v1/usage":
            self.send_json(200, self.usage_report())
        elif route == "/metrics":
            self.send_metrics()
        elif route == "/":
            self.send_status_page()
        elif route == "/v1/status":
            self.send_json(200, {**self.server_state(), "usage": self.usage_report(),
                                 "recent": list(self.server.recent)})
        elif route == "/v1/models":
            self.send_json(200, {"object": "list", "data": [model_object(m) for m in LISTED_MODELS]})
        elif route == "/v1/models/{id}":
            resolve_model(item)
            self.send_json(200, model_object(item))
        elif route == "/v1/responses/{id}":
            self.stored_response(item)
        elif route == "/v1/responses":
            self.create_response()
        elif route == "/v1/messages":
            self.create_message()
        elif route == "/v1/messages/count_tokens":
            raise ApiError(404, "Claude Code cannot count tokens without sending the request to Claude, and the "
                                "proxy does not guess: send the request to /v1/messages and read its usage.",
                           code="not_supported")
        else:
            self.chat_completions()

    # ── checks ──
    def check_origin(self):
        origin = self.headers.get("Origin")
        if origin and not self.cors_allows(origin):
            # A web page must not spend the user's subscription; browsers always send Origin.
            raise ApiError(403, f"Origin '{origin}' is not allowed; start the proxy with "
                                "--cors-origin ORIGIN to accept it.", code="origin_not_allowed")

    def cors_allows(self, origin: str) -> bool:
        origins = self.server.config.cors_origins
        return "*" in origins or origin in origins

    def check_api_key(self):
        if not self.key_given():
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' (or "
                                "'x-api-key: <key>') with the key given to --api-key.", code="invalid_api_key",
                           headers=[("WWW-Authenticate", "Bearer")])

    def key_given(self) -> bool:
        """Whether the request carries the --api-key, if there is one."""
        key = self.server.config.api_key
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = self.headers.get("x-api-key", "")  # as Anthropic's clients send it
        return key is None or hmac.compare_digest(given.strip().encode(), key.encode())

    def read_json(self) -> object:
        """The body, within --read-timeout, parsed; check_head has checked its length."""
        length = self.declared_length
        if length is None:
            self.close_connection = True
            raise ApiError(411, "Send the JSON body with a Content-Length header.", code="length_required")
        self.reads.phase(self.server.config.read_timeout)
        try:
            raw = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise ApiError(408, f"The request body did not arrive within --read-timeout "
                                f"({self.server.config.read_timeout:g} s).", code="request_timeout") from None
        except OSError:
            raise ClientGone() from None
        if len(raw) < length:
            raise ClientGone()  # it left in the middle of its body
        self.body_read, self.body_length = True, length
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            detail = exc if isinstance(exc, ValueError) else "nested too deeply"
            raise ApiError(400, f"The request body is not valid JSON: {detail}.", code="invalid_json") from None

    def client_gone(self) -> bool:
        """Whether the client has closed its connection (or its sending half), or it broke.

        Linux says so with POLLRDHUP even when bytes it sent wait unread (a
        pipelined request); elsewhere only once they have been read.
        """
        # poll(), not select(): select() fails on descriptors above 1023.
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | PEER_CLOSED)
        try:
            ready = poller.poll(0)
            if not ready:
                return False
            if ready[0][1] & (PEER_CLOSED | select.POLLHUP | select.POLLERR):
                return True
            return self.connection.recv(1, socket.MSG_PEEK) == b""  # readable and empty: closed
        except OSError:
            return True

    # ── chat completions ──
    def chat_completions(self):
        request = parse_chat_request(self.read_body())
        self.reply = Reply(request.model, include_usage=request.include_usage,
                           legacy_functions=request.legacy_functions)
        self.send_reply(request)

    # ── responses (not `responses`: BaseHTTPRequestHandler.responses holds the status phrases) ──
    def create_response(self):
        body = self.read_body()
        previous = _optional(body, "previous_response_id", (str,), None) if isinstance(body, dict) else None
        earlier = self.server.stored.conversation(previous) if previous else []
        request, new_messages = parse_responses_request(body, earlier)
        builder = self.reply = ResponseBuilder(response_echo(body), namespaces_of(body.get("tools") or []))

        def keep():
            if body.get("store", True) is not False:
                self.server.stored.put(builder.response, earlier + new_messages + builder.chat_messages(),
                                       size=self.body_length + len(json_bytes(builder.output)))
        self.send_reply(request, keep)

    # ── messages ──
    def create_message(self):
        request = parse_messages_request(self.read_body())
        self.reply = MessageBuilder(request.chat.model, request.shows_thinking)
        self.send_reply(request.chat)

    def stored_response(self, response_id: str):
        if self.command == "DELETE":
            self.server.stored.delete(response_id)
            self.send_json(200, {"id": response_id, "object": "response", "deleted": True})
        else:
            self.send_json(200, self.server.stored.get(response_id))

    # ── one turn of the CLI, for either API ──
    def read_body(self) -> object:
        body = self.read_json()
        check_nesting(body)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            self.log_model = one_line(body["model"], limit=100)
        return body

    def answer(self, lease: Lease, request: ChatRequest) -> Iterator:
        """One turn of the lease's CLI: TextDelta, ToolCallDelta, None after silence, and last TurnEnd."""
        try:
            for event in lease.run_turn(request, self.server.config.timeout, self.client_gone):
                if isinstance(event, TurnEnd):
                    self.log_usage = event.usage
                yield event
        except ApiError:
            if self.server.stopping.is_set():  # we stopped its CLI ourselves
                raise shutting_down() from None
            raise

    def lease(self, request: ChatRequest):
        if self.client_gone():  # it left while its request waited: no CLI for it
            raise ClientGone()
        refusal = extra_usage_refusal(self.server.windows.latest(), time.time())  # also after the wait
        if refusal and not self.server.config.allow_extra_usage:
            raise refusal
        return self.server.pool.lease(request, self.tenant())

    def tenant(self) -> str:
        """Whose conversations this request may go on with: those of requests with the same key, or none."""
        key = self.headers.get("Authorization") or self.headers.get("x-api-key") or ""
        return hashlib.blake2b(key.encode("utf-8", "replace")).hexdigest()

    def send_reply(self, request: ChatRequest, at_end: Callable[[], None] = lambda: None):
        """Answer with the turn, streamed or as one body; at_end runs before the client hears the end,
        so that a client's next request finds what at_end kept."""
        with self.server.gate.slot(self.client_gone), self.lease(request) as lease, \
                closing(self.answer(lease, request)) as events:
            self.log_served = lease.served
            if not request.stream:
                body = self.reply.whole(turn_end(events))
                at_end()
                lease.hand_back()
                return self.send_json(200, body)
            for event in events:
                if event is None:  # the CLI has nothing more for now
                    if not self.unsent and time.monotonic() - self.last_sent >= KEEPALIVE_SECONDS:
                        self.begin_stream()  # clients and proxies must not time out while Claude is silent
                        self.unsent.append(self.reply.keepalive)
                    self.send_unsent()
                    continue
                if isinstance(event, TurnStart):  # the stream opens with Claude's first words, not before
                    self.turn_start = event
                    continue
                self.begin_stream()
                if self.first_token is None and not isinstance(event, TurnEnd):
                    self.first_token = time.monotonic() - self.started
                frames = self.reply.feed(event)
                if isinstance(event, TurnEnd):
                    self.send_unsent()  # the last words first: what follows takes longer with a long history
                    at_end()
                    lease.hand_back()
                self.unsent += map(self.reply.sse, frames)
                if isinstance(event, TurnEnd):
                    self.end_sse()  # now: stopping the CLI can take a moment more

    def server_state(self) -> dict:
        server = self.server
        return {"claude_version": server.cli_version, "in_flight": server.gate.running,
                "queued": server.gate.waiting, "processes": server.pool.counts()}

    def usage_report(self) -> dict:
        return usage_report(self.server.windows.latest(), time.time(), self.server.config.allow_extra_usage)

    # ── writing ──
    def base_headers(self) -> List[Tuple[str, str]]:
        headers = [("x-request-id", self.request_id)]
        if self.messages_api:
            headers.append(("request-id", self.request_id))  # where Anthropic's SDKs read it
        if self.endpoint in COMPLETION_ROUTES and self.key_given():
            headers += usage_headers(self.server.windows.latest(), time.time())
        origin = self.headers.get("Origin") if self.headers is not None else None  # None: bad request line
        if origin and self.cors_allows(origin):
            headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                        ("Access-Control-Expose-Headers",
                         ", ".join(("x-request-id", "retry-after", *USAGE_HEADERS)))]
        return headers

    def send_head(self, status: int, headers: Sequence[Tuple[str, str]]):
        self.status = status
        try:
            self.send_response(status)
            for name, value in [*self.base_headers(), *headers]:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.limit_writes()
            self.end_headers()
        except OSError:
            raise ClientGone() from None

    def send_metrics(self):
        server = self.server
        text = server.metrics.render(server.pool.counts(), server.pool.starts, server.gate.running,
                                     server.gate.waiting, server.windows.latest(), time.time())
        self.send_body(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def send_status_page(self):
        self.send_body(200, STATUS_PAGE.encode(), "text/html; charset=utf-8", [
            ("Content-Security-Policy", STATUS_PAGE_POLICY), ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])

    def send_json(self, status: int, body: dict, headers: Sequence[Tuple[str, str]] = ()):
        self.send_body(status, json_bytes(body), "application/json", headers)

    def send_body(self, status: int, data: bytes, content_type: str, headers: Sequence[Tuple[str, str]] = ()):
        self.send_head(status, [*headers, ("Content-Type", content_type), ("Content-Length", str(len(data)))])
        if self.command != "HEAD":
            self.write(data)

    def send_api_error(self, err: ApiError):
        if self.sse_started:  # the status line is gone: OpenAI clients read an error frame
            self.status = err.status
            try:
                self.unsent += map(self.reply.sse, self.reply.fail(err))
                self.end_sse()
            except ClientGone:
                self.close_connection = True
            return
        if not self.body_read and self.declared_length:  # (check_head refused any other framing)
            self.close_connection = True  # its unread body must not be taken for the next request
        body = err.anthropic_body() if self.messages_api else err.body()
        try:
            self.send_json(err.status, body, err.headers)
        except ClientGone:
            self.close_connection = True

    def send_preflight(self):
        origin = self.headers.get("Origin")
        headers = [("Allow", ", ".join(METHODS))]
        if origin:
            requested = self.headers.get("Access-Control-Request-Headers", "")
            allowed = requested if HEADER_LIST.fullmatch(requested.strip()) else "authorization, content-type"
            headers += [("Access-Control-Allow-Methods", ", ".join(METHODS)),
                        ("Access-Control-Allow-Headers", allowed), ("Access-Control-Max-Age", "600")]
        self.send_head(204, [*headers, ("Content-Length", "0")])

    def begin_stream(self):
        """Send the status line and headers, once: only when there is something to stream, so a
        failure before it still gets its HTTP status."""
        if not self.sse_started:
            self.sse_started = True
            self.send_head(200, [("Content-Type", "text/event-stream; charset=utf-8"),
                                 ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked"),
                                 ("X-Accel-Buffering", "no")])
            self.unsent += map(self.reply.sse, self.reply.start(self.turn_start))

    def send_unsent(self):
        """Send the frames made so far in one chunk: a burst of deltas costs one write, not one each."""
        if self.unsent:
            self.write_chunk(b"".join(self.unsent))
            self.unsent.clear()
            self.last_sent = time.monotonic()

    def end_sse(self):
        if self.reply.stream_end:
            self.unsent.append(self.reply.stream_end)
        self.send_unsent()
        self.write_chunk(b"")  # the zero-length chunk ends the chunked body

    def write_chunk(self, data: bytes):
        self.write(b"%x\r\n%s\r\n" % (len(data), data))

    def write(self, data: bytes):
        """Send data, or raise ClientGone if the client has left or stopped reading (limit_writes)."""
        try:
            self.limit_writes()
            self.connection.sendall(data)
        except OSError:  # socket.timeout too
            raise ClientGone() from None

    def limit_writes(self):
        """Give each write only what is left of the request's --timeout (a socket timeout bounds a
        sendall as a whole): a client that stops reading must not hold its CLI and slot past it."""
        left = self.started + self.server.config.timeout - time.monotonic()
        self.connection.settimeout(max(left, WRITE_GRACE_SECONDS))

    # ── at the end of a request: its metrics, and one log line, never prompt or completion text ──
    def request_finished(self):
        route, seconds, usage = self.endpoint, time.monotonic() - self.started, self.log_usage
        self.server.metrics.request_done(route or "other", self.log_model, self.status, seconds,
                                         self.first_token, usage, self.log_served)
        if route in COMPLETION_ROUTES:
            self.server.recent.append({
                "time": iso_time(time.time()), "endpoint": route, "model": self.log_model, "status": self.status,
                "tokens": f"{usage.prompt_tokens}+{usage.output_tokens}" if usage else "-",
                "duration": round(seconds, 3), "served": self.log_served})
        self.log_access()

    def log_access(self):
        usage = self.log_usage
        tokens = f"{usage.prompt_tokens}+{usage.output_tokens}" if usage else "-"
        log.info("%s %s %s model=%s tokens=%s served=%s %.3fs id=%s", one_line(self.command or "-"),
                 one_line(self.route_path or self.path or "-"), self.status, self.log_model, tokens,
                 self.log_served, time.monotonic() - self.started, self.request_id)

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), one_line(format % args, limit=1000))


# ── 9. main ─────────────────────────────────────────────────────────────────

def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse_config(argv, os.environ)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if not is_loopback(config.host) and not config.api_key and not config.allow_unauthenticated_remote:
        print(f"claude-max-proxy: refusing to listen on {config.host} without --api-key: anyone who "
              "can reach it could use your subscription (--allow-unauthenticated-remote to insist)",
              file=sys.stderr)
        return 2
    try:
        cli_version = read_cli_version(config)
        server = ProxyServer(config, cli_version)
    except RuntimeError as exc:
        print(f"claude-max-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"claude-max-proxy: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    removed = [name for name in BILLING_VARIABLES if name in os.environ and not config.use_api_key]
    if removed:
        log.warning("%s removed from the CLI's environment so your subscription is used, not per-token "
                    "API billing (--use-api-key to keep it)", " and ".join(removed))
    # The server accepts on a thread of its own, and a signal only asks for the stop: an exception
    # raised in the accepting thread could drop a connection between its accept and its handler.
    # The signal may reach any thread; Python writes it to the wakeup pipe, which wakes main.
    wakeup, signalled = os.pipe()
    os.set_blocking(signalled, False)
    signal.set_wakeup_fd(signalled)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: None)
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    log.info("claude-max-proxy %s on http://%s:%d/v1 (Claude Code %s; extra usage %s)", __version__,
             config.host, server.server_address[1], cli_version,
             "allowed" if config.allow_extra_usage else "refused, --allow-extra-usage to allow it")
    os.read(wakeup, 1)
    log.info("shutting down")
    server.drain_and_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
