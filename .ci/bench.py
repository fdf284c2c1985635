"""Time to first token: a streamed request through the proxy, next to the bare CLI.

Both run the real CLI against the same fake Anthropic API on 127.0.0.1, which
answers at once, so the figures are the overhead of the CLI and of the proxy.
Run with `make bench`.
"""
import http.client
import json
import os
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

RUNS = 15


def bare_cli_ttft(claude: str) -> float:
    """Spawn the CLI as the proxy does, send one prompt, wait for the first text delta."""
    settings = cmp.LaunchSettings(model="sonnet")
    with tempfile.TemporaryDirectory() as workdir:
        started = time.perf_counter()
        child = subprocess.Popen(cmp.build_cli_argv(claude, settings), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir,
                                 env=cmp.build_cli_env(os.environ, cmp.Config(), settings))
        child.stdin.write(cmp.control_line("init", "initialize", systemPrompt=""))
        child.stdin.write(cmp.user_line(cmp.Turn("user", [{"type": "text", "text": "hi"}])))
        child.stdin.flush()
        for raw in child.stdout:
            event = json.loads(raw)
            if event.get("type") == "stream_event" and \
                    event["event"].get("delta", {}).get("type") == "text_delta":
                elapsed = time.perf_counter() - started
                break
        child.stdin.close()
        child.wait()
    return elapsed


def proxy_ttft(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "sonnet", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
        {"Content-Type": "application/json"})
    reply = conn.getresponse()
    for line in iter(reply.readline, b""):
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            elapsed = time.perf_counter() - started
            break
    reply.read()
    conn.close()
    return elapsed


def describe(name: str, seconds: list) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return (f"{name:<28} median {statistics.median(ms):6.0f} ms   min {ms[0]:6.0f} ms   "
            f"p90 {ms[int(len(ms) * 0.9) - 1]:6.0f} ms   ({len(ms)} runs)")


def main():
    claude = str(test_proxy.REAL_CLI)
    upstream = test_proxy.FakeAnthropic()
    home = tempfile.mkdtemp()
    os.environ.update(HOME=home, ANTHROPIC_BASE_URL=upstream.url, CLAUDE_CODE_OAUTH_TOKEN="test",
                      CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        os.environ.pop(name, None)
    server = cmp.ProxyServer(cmp.Config(port=0, claude=claude), "bench")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bare, proxied = [], []
    for _ in range(RUNS):  # interleaved, so both see the same machine load
        bare.append(bare_cli_ttft(claude))
        proxied.append(proxy_ttft(server.server_address[1]))
    server.shutdown()
    server.drain_and_close()
    upstream.shutdown()
    print("Time to first token of a streamed reply, fake upstream on 127.0.0.1:")
    print(describe("bare CLI (spawn → delta)", bare))
    print(describe("through the proxy", proxied))
    print(f"proxy overhead (median): {(statistics.median(proxied) - statistics.median(bare)) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
