"""The proxy's speed, CPU and memory, next to the bare CLI, printed as one table.

Everything runs the real CLI against one fake Anthropic API on 127.0.0.1 that
answers at once, so the figures are the cost of the CLI and of the proxy. The
proxy runs as users run it (`python3 claude_max_proxy.py`), once per setting.
This machine is shared and noisy: every timing is interleaved with the bare
CLI's in the same run and given as a ratio to it, with medians and p90.
Run with `make bench`.
"""
import http.client
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import claude_max_proxy as cmp  # noqa: E402
import test_proxy  # noqa: E402  (the fake Anthropic API)

RUNS = 15       # of each first-token timing
LOOPS = 5       # 10-step tool loops, each way
LOOP_STEPS = 10
WORDS = 3000    # in the stream whose relay is timed
RELAY_CLIS = 8  # CLIs of each kind whose stream is timed: one CLI runs faster than another
RELAYS = 3      # timings of each of them
FIRST_WORD, LAST_WORD = b"word0 ", f"word{WORDS - 1} ".encode()  # each word comes as a delta of its own
CPU_REQUESTS = 8
CONCURRENT = 8
TICK = os.sysconf("SC_CLK_TCK")


# ── the bare CLI, started as the proxy starts it ──

def bare_cli(claude: str, workdir: str) -> float:
    """Spawn the CLI as the proxy does and ask one question: seconds to its first text delta."""
    started = time.perf_counter()
    child = start_cli(claude, workdir)
    for raw in child.stdout:
        event = json.loads(raw)
        if event.get("type") == "control_request":
            answer_tool_server(child, event)
        elif event.get("type") == "stream_event" and event["event"].get("delta", {}).get("type") == "text_delta":
            break
    elapsed = time.perf_counter() - started
    child.stdin.close()
    child.wait()
    return elapsed


class BareConversation:
    """One CLI, started as the proxy starts it, asked one question after another."""

    def __init__(self, claude: str, workdir: str):
        self.child = start_cli(claude, workdir)
        for line in self.child.stdout:  # its first turn, with its tool server's handshake
            if b'"control_request"' in line[:32]:
                answer_tool_server(self.child, json.loads(line))
            elif b'"type":"result"' in line:
                break

    def ask(self, question: str) -> float:
        """Seconds from the first word of the long answer to its last, read as the proxy reads."""
        self.child.stdin.write(cmp.user_line(cmp.Turn("user", [{"type": "text", "text": question}])))
        self.child.stdin.flush()
        seen, first = b"", None
        while LAST_WORD not in seen:  # the deltas come before the whole answer does
            data = self.child.stdout.read1(1 << 16)
            if first is None and FIRST_WORD in seen[-32:] + data:
                first = time.perf_counter()
            seen = seen[-32:] + data
            time.sleep(cmp.READ_PAUSE_SECONDS)  # eager reads would cost the CLI time too
        elapsed = time.perf_counter() - first
        while b'"type":"result"' not in seen:
            seen = seen[-32:] + self.child.stdout.read1(1 << 16)
        return elapsed

    def close(self):
        self.child.stdin.close()
        self.child.wait()


def start_cli(claude: str, workdir: str) -> subprocess.Popen:
    settings = cmp.LaunchSettings(model="sonnet")
    child = subprocess.Popen(cmp.build_cli_argv(claude, settings), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=workdir,
                             env=cmp.build_cli_env(os.environ, cmp.Config(), settings))
    child.stdin.write(cmp.initialize_line(cmp.SessionSettings()))
    child.stdin.write(cmp.user_line(cmp.Turn("user", [{"type": "text", "text": "hi"}])))
    child.stdin.flush()
    return child


def answer_tool_server(child: subprocess.Popen, event: dict):
    """As the proxy does for a request without tools."""
    reply = cmp.mcp_reply(event["request"]["message"], (), {})
    child.stdin.write(cmp.control_reply(event["request_id"], {"mcp_response": reply}))
    child.stdin.flush()


# ── the proxy, as a user runs it ──

class Proxy:
    def __init__(self, claude: str, *options: str, as_module: bool = False):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        program = ["-m", "claude_max_proxy"] if as_module else [str(HERE / "claude_max_proxy.py")]
        self.process = subprocess.Popen(
            [sys.executable, *program, "--claude", claude, "--port", str(self.port),
             "--log-level", "warning", *options], stderr=subprocess.DEVNULL, cwd=HERE)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.health()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def request(self, method: str, path: str, body=None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        return conn.getresponse()

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health").read())

    def wait_for(self, **counts):
        """Until /health shows these process counts: what a request finds when it comes."""
        while any(self.health()["processes"][state] != n for state, n in counts.items()):
            time.sleep(0.02)

    def chat(self, **body) -> dict:
        reply = self.request("POST", "/v1/chat/completions", {"model": "sonnet", **body})
        return json.loads(reply.read())

    def relay(self, **body) -> float:
        """Seconds from the first word of the long answer to its last, read as bytes off the socket."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "sonnet", "stream": True, **body}),
                     {"Content-Type": "application/json"})
        sock, seen, first = conn.sock, b"", None
        while LAST_WORD not in seen:
            data = sock.recv(1 << 16)
            assert data, "the stream ended early"
            if first is None and FIRST_WORD in seen[-32:] + data:
                first = time.perf_counter()
            seen = seen[-32:] + data
        elapsed = time.perf_counter() - first
        while not seen.endswith(b"0\r\n\r\n"):  # to its end: a client that leaves early ends its conversation
            seen = seen[-32:] + sock.recv(1 << 16)
        conn.close()
        return elapsed

    def stream(self, **body) -> tuple:
        """(seconds to the first content delta, to the last, and the text)."""
        started = time.perf_counter()
        reply = self.request("POST", "/v1/chat/completions", {"model": "sonnet", "stream": True, **body})
        first = last = None
        text = []
        for line in iter(reply.readline, b""):
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    last = time.perf_counter() - started
                    first = first or last
                    text.append(delta)
        return first, last, "".join(text)

    def cpu(self) -> float:
        """CPU seconds of the proxy and of every CLI it started, stopped ones included."""
        fields = stat(self.process.pid)
        return sum(int(field) for field in fields[11:15]) / TICK + \
            sum(sum(int(field) for field in stat(child)[11:13]) / TICK for child in children(self.process.pid))

    def memory(self) -> tuple:
        """(the proxy's own RSS, its CLI processes' count, and their RSS), in MB."""
        clis = children(self.process.pid)
        return rss(self.process.pid), len(clis), sum(rss(child) for child in clis)

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


def stat(pid: int) -> list:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return found


def rss(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


# ── what the fake upstream answers ──

def tool_loop(upstream):
    """The next LOOP_STEPS upstream calls: a tool call each, and then the answer."""
    upstream.script = [test_proxy.tool_use((f"toolu_step{step}", "get_weather", {"city": "Oslo"}))
                       for step in range(LOOP_STEPS - 1)]


def slow_answer(seconds: float, pieces: int = 50):
    def respond(handler, body):
        handler.start_stream()
        handler.event({"type": "message_start", "message": {
            "id": "msg_slow", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}})
        handler.event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        for _ in range(pieces):
            time.sleep(seconds / pieces)
            handler.event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "w "}})
        handler.event({"type": "content_block_stop", "index": 0})
        handler.event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}})
        handler.event({"type": "message_stop"})
        handler.wfile.write(b"0\r\n\r\n")
    return respond


WEATHER = test_proxy.WEATHER


def run_loop(proxy: Proxy, upstream, number: int) -> float:
    """One agent's tool loop, as openai-agents runs it: its wall time."""
    tool_loop(upstream)
    messages = [{"role": "user", "content": f"Loop {number}: weather in Oslo, ten times?"}]
    started = time.perf_counter()
    for step in range(LOOP_STEPS):
        message = proxy.chat(tools=[WEATHER], messages=messages)["choices"][0]["message"]
        messages.append({key: value for key, value in message.items() if value is not None and key != "refusal"})
        for call in message.get("tool_calls") or []:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": f"sunny, step {step}"})
        if not message.get("tool_calls"):
            break
    assert step == LOOP_STEPS - 1 and message["content"], message
    return time.perf_counter() - started


# ── the measurements ──

def first_tokens(claude, upstream, workdir) -> dict:
    """Time to first token: bare CLI; new chats with the pool on and off; turn 2 of a conversation."""
    pooled, plain = Proxy(claude), Proxy(claude, "--spares", "0", "--conversations", "0")
    times = {"bare": [], "new, pool on": [], "new, pool off": [], "turn 2": []}
    try:
        pooled.chat(messages=[{"role": "user", "content": "warm-up"}])
        for run in range(RUNS):  # interleaved, so all see the same machine load
            # Each is timed once the proxies are at rest: a spare that is still starting
            # would take CPU from what is timed, here as between a user's requests.
            times["bare"].append(bare_cli(claude, workdir))
            times["new, pool off"].append(plain.stream(messages=[{"role": "user", "content": f"new {run}"}])[0])
            plain.wait_for(running=0)
            pooled.wait_for(spare=1, running=0)
            times["new, pool on"].append(pooled.stream(messages=[{"role": "user", "content": f"new {run}"}])[0])
            first = [{"role": "user", "content": f"chat {run}"}]
            answer = pooled.chat(messages=first)["choices"][0]["message"]["content"]
            pooled.wait_for(spare=1, running=0)
            times["turn 2"].append(pooled.stream(messages=[*first, {"role": "assistant", "content": answer},
                                                           {"role": "user", "content": "and then?"}])[0])
    finally:
        pooled.stop()
        plain.stop()
    return times


def tool_loops(claude, upstream, workdir) -> dict:
    reused, replayed = Proxy(claude), Proxy(claude, "--spares", "0", "--conversations", "0")
    times = {"bare": [], "loop, reuse on": [], "loop, reuse off": []}
    try:
        for number in range(LOOPS):
            times["bare"].append(bare_cli(claude, workdir))
            times["loop, reuse on"].append(run_loop(reused, upstream, number))
            times["loop, reuse off"].append(run_loop(replayed, upstream, number))
    finally:
        reused.stop()
        replayed.stop()
    upstream.script = []
    return times


# The relay is timed against a fake upstream of its own process: in this one, its
# threads would share a lock with the bare CLI's reader, and slow that alone.
WORDY_UPSTREAM = f"""
import sys, threading
sys.path.insert(0, {str(HERE)!r})
import test_proxy
upstream = test_proxy.FakeAnthropic()
upstream.default = test_proxy.answer(pieces=[f"word{{i}} " for i in range({WORDS})])
print(upstream.url, flush=True)
threading.Event().wait()
"""


def relay(claude, workdir) -> dict:
    """First to last token of a 3,000-word answer: through the proxy, and bare twice, as a floor for
    what the figure can tell apart.

    Each CLI is timed in a conversation under way: a CLI's first turn runs its
    code for the first time, and varies too much to compare. How fast a CLI
    runs varies by up to a fifth from one to the next, so a fresh set of three
    is started RELAY_CLIS times. A CLI still works for a moment after its
    answer, which slows the next one timed: the three take turns in every order.
    """
    upstream = subprocess.Popen([sys.executable, "-c", WORDY_UPSTREAM], stdout=subprocess.PIPE)
    url = upstream.stdout.readline().decode().strip()
    base_url = os.environ["ANTHROPIC_BASE_URL"]
    os.environ["ANTHROPIC_BASE_URL"] = url  # for the CLIs started now
    proxy = Proxy(claude, "--spares", "0", "--conversations", "1")
    kinds = ("proxy", "bare", "bare again")
    times = {kind: [] for kind in kinds}

    def start(kind: str, number: int):
        if kind == "proxy":
            return ProxiedConversation(proxy, number)
        return BareConversation(claude, workdir)

    orders = itertools.cycle(itertools.permutations(kinds))
    try:
        for number in range(RELAY_CLIS):
            clis = {kind: start(kind, number) for kind in next(orders)}
            for run in range(RELAYS):
                for kind in next(orders):
                    times[kind].append(clis[kind].ask(f"again {run}"))
            for cli in clis.values():
                cli.close()
    finally:
        os.environ["ANTHROPIC_BASE_URL"] = base_url
        proxy.stop()
        upstream.kill()
        upstream.wait()
    return times


class ProxiedConversation:
    """A conversation of its own in the proxy, and so a CLI of its own, asked as BareConversation is."""

    def __init__(self, proxy: Proxy, number: int):
        self.proxy = proxy
        self.messages = [{"role": "user", "content": f"conversation {number}: a long answer, please"}]
        proxy.relay(messages=self.messages)

    def ask(self, question: str) -> float:
        self.messages += [{"role": "assistant", "content": "".join(f"word{i} " for i in range(WORDS))},
                          {"role": "user", "content": question}]
        return self.proxy.relay(messages=self.messages)

    def close(self):
        pass  # the proxy ends it when the next conversation comes (--conversations 1)


def cpu_per_request(claude) -> dict:
    found = {}
    cold = Proxy(claude, "--spares", "0", "--conversations", "0")
    try:
        before = cold.cpu()
        for number in range(CPU_REQUESTS):
            cold.chat(messages=[{"role": "user", "content": f"cold {number}"}])
        found["cold"] = (cold.cpu() - before) / CPU_REQUESTS
    finally:
        cold.stop()
    live = Proxy(claude, "--spares", "0")
    try:
        messages = [{"role": "user", "content": "a long chat"}]
        for number in range(CPU_REQUESTS + 1):
            if number == 1:
                before = live.cpu()  # from the second turn on, every turn goes on in the same CLI
            messages.append(live.chat(messages=messages)["choices"][0]["message"])
            messages[-1] = {"role": "assistant", "content": messages[-1]["content"]}
            messages.append({"role": "user", "content": f"and {number}?"})
        found["continued"] = (live.cpu() - before) / CPU_REQUESTS
    finally:
        live.stop()
    return found


def idle_memory(proxy: Proxy) -> tuple:
    """The proxy's memory() at rest after one chat: holding a spare and a live conversation."""
    proxy.chat(messages=[{"role": "user", "content": "hello"}])
    proxy.wait_for(spare=1, live=1, running=0)
    return proxy.memory()


def empty_interpreter_rss() -> float:
    empty = subprocess.Popen([sys.executable, "-c", "print(flush=True); input()"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    empty.stdout.readline()
    try:
        return rss(empty.pid)
    finally:
        empty.communicate("\n")


def memory(claude, upstream) -> dict:
    # CPython keeps a script's parse tree while the script runs, and frees a module's once it is compiled.
    as_module = Proxy(claude, as_module=True)
    try:
        module_rss = idle_memory(as_module)[0]
    finally:
        as_module.stop()
    proxy = Proxy(claude, "--max-concurrency", str(CONCURRENT))
    try:
        idle = idle_memory(proxy)
        upstream.default = slow_answer(3.0)
        threads = [threading.Thread(target=proxy.stream, kwargs={"messages": [
            {"role": "user", "content": f"stream {n}"}]}) for n in range(CONCURRENT)]
        for thread in threads:
            thread.start()
        busy = (0.0, 0, 0.0)
        while any(thread.is_alive() for thread in threads):
            sample = proxy.memory()
            busy = max(busy, sample, key=lambda s: s[1] * 10_000 + s[0])
            time.sleep(0.1)
        counts = proxy.health()["processes"]
    finally:
        proxy.stop()
        upstream.default = test_proxy.answer()
    return {"idle": idle, "busy": busy, "limit": counts["limit"], "as_module": module_rss,
            "empty": empty_interpreter_rss()}


# ── the table ──

def median(values) -> float:
    return statistics.median(values)


def p90(values) -> float:
    ordered = sorted(values)
    return ordered[max(int(len(ordered) * 0.9 + 0.5) - 1, 0)]


def main():
    claude = str(test_proxy.REAL_CLI)
    upstream = test_proxy.FakeAnthropic()
    home, workdir = tempfile.mkdtemp(), tempfile.mkdtemp()
    os.environ.update(HOME=home, ANTHROPIC_BASE_URL=upstream.url, CLAUDE_CODE_OAUTH_TOKEN="test",
                      CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        os.environ.pop(name, None)
    ttft = first_tokens(claude, upstream, workdir)
    loops = tool_loops(claude, upstream, workdir)
    streams = relay(claude, workdir)
    cpu = cpu_per_request(claude)
    mem = memory(claude, upstream)
    upstream.shutdown()

    bare = median(ttft["bare"])
    rows = []

    def ratio_row(name, values, base, target):
        """A timing as a ratio to the bare CLI's; `target` None for a figure given to compare with."""
        ratio = median(values) / base
        met = "" if target is None else "yes" if ratio <= target else "NO"
        rows.append((name, f"{median(values) * 1000:7.0f} ms", f"{p90(values) * 1000:7.0f} ms",
                     f"{ratio:5.2f}", "" if target is None else f"≤ {target}", met))

    rows.append(("first token, bare CLI (spawn → delta)", f"{bare * 1000:7.0f} ms",
                 f"{p90(ttft['bare']) * 1000:7.0f} ms", " 1.00", "", ""))
    ratio_row("first token, new chat, pool on", ttft["new, pool on"], bare, 0.2)
    ratio_row("first token, new chat, pool off", ttft["new, pool off"], bare, None)
    ratio_row("first token, turn 2 extending turn 1", ttft["turn 2"], bare, 0.15)
    loop_bare = median(loops["bare"])
    steps_on = [total / LOOP_STEPS for total in loops["loop, reuse on"]]
    steps_off = [total / LOOP_STEPS for total in loops["loop, reuse off"]]
    ratio_row("one step of a 10-step tool loop, reuse on", steps_on, loop_bare, 0.25)
    ratio_row("one step of a 10-step tool loop, reuse off", steps_off, loop_bare, None)
    overhead = median(streams["proxy"]) / median(streams["bare"]) - 1
    rows.append((f"relay of a {WORDS:,}-word stream (first → last token)",
                 f"{median(streams['proxy']) * 1000:7.0f} ms", f"{p90(streams['proxy']) * 1000:7.0f} ms",
                 f"{overhead * 100:+4.1f} %", "< 5 %", "yes" if overhead < 0.05 else "NO"))
    for kind, name in (("bare", "  the same, bare CLI"), ("bare again", "  a second bare CLI (the noise floor)")):
        rows.append((name,
                     f"{median(streams[kind]) * 1000:7.0f} ms", f"{p90(streams[kind]) * 1000:7.0f} ms",
                     f"{(median(streams[kind]) / median(streams['bare']) - 1) * 100:+4.1f} %", "", ""))
    cpu_ratio = cpu["continued"] / cpu["cold"]
    rows.append(("CPU per request, cold (proxy + its CLIs)", f"{cpu['cold']:7.2f} s", "", " 1.00", "", ""))
    rows.append(("CPU per request, continued", f"{cpu['continued']:7.2f} s", "", f"{cpu_ratio:5.2f}", "≤ 0.25",
                 "yes" if cpu_ratio <= 0.25 else "NO"))
    (own_idle, clis_idle, cli_rss_idle), (own_busy, clis_busy, cli_rss_busy) = mem["idle"], mem["busy"]
    rows.append(("proxy's own RSS, idle", f"{own_idle:7.1f} MB", "", "", "< 30 MB", "yes" if own_idle < 30 else "NO"))
    rows.append(("  the same, run as `python3 -m claude_max_proxy`", f"{mem['as_module']:7.1f} MB", "", "", "", ""))
    rows.append(("  an empty python3 here, for scale", f"{mem['empty']:7.1f} MB", "", "", "", ""))
    rows.append((f"proxy's own RSS, {CONCURRENT} concurrent streams", f"{own_busy:7.1f} MB", "", "", "", ""))
    rows.append(("CLI processes idle (a spare, a live chat)", f"{clis_idle:7d}", f"{cli_rss_idle:7.0f} MB", "", "", ""))
    rows.append((f"CLI processes, {CONCURRENT} concurrent streams", f"{clis_busy:7d}", f"{cli_rss_busy:7.0f} MB",
                 "", f"≤ {mem['limit']}", "yes" if clis_busy <= mem["limit"] else "NO"))

    version = cmp.read_cli_version(cmp.Config(claude=claude))
    print(f"claude-max-proxy {cmp.__version__}, Claude Code {version} on a fake upstream "
          f"that answers at once; {RUNS} interleaved runs ({LOOPS} loops each way); ratios of medians "
          "to the bare CLI's in the same run")
    header = ("measure", "median", "p90", "ratio", "target", "met")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
