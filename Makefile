# claude-max-proxy: `make run` serves on 127.0.0.1:3456, `make test` runs the tests.

PYTHON ?= python3
CLAUDE_CODE_VERSION = 2.1.329
CLI_DIR = .cache/claude
CLI = $(CLI_DIR)/node_modules/.bin/claude
AGENT = $(HOME)/Library/LaunchAgents/com.claude-max-api.plist
LAUNCHCTL = launchctl
UNIT = $(HOME)/.config/systemd/user/claude-max-proxy.service
OPTIONS_FILE = $(HOME)/.config/claude-max-proxy/env
SYSTEMCTL = systemctl --user

.PHONY: run test cli bench fuzz install-launchagent uninstall-launchagent \
	systemd-unit install-systemd uninstall-systemd

run:
	$(PYTHON) claude_max_proxy.py

# The tests drive the real CLI, pinned and kept in .cache/, against a fake API on 127.0.0.1.
test: $(CLI)
	$(PYTHON) -m pytest -q test_proxy.py

cli: $(CLI)

# Time to first token through the proxy next to the bare CLI, on a fake upstream.
bench: $(CLI)
	$(PYTHON) .ci/bench.py

# Thousands of mutated requests, four connections at a time, against the fake CLI:
# FUZZ_CASES=N sets how many, FUZZ_SEED=S replays a run (make test runs 300).
fuzz:
	FUZZ_MANY=1 $(PYTHON) -m pytest -q -s test_proxy.py -k test_http_fuzz_many

# npm may skip the package's install script, which puts the platform binary in
# place of a small stub; copy the binary from the platform package ourselves.
$(CLI):
	npm install --prefix $(CLI_DIR) --no-save --no-audit --no-fund @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	@exe=$(CLI_DIR)/node_modules/@anthropic-ai/claude-code/bin/claude.exe; \
	if [ "$$(wc -c < $$exe)" -lt 1000000 ]; then \
		cp $(CLI_DIR)/node_modules/@anthropic-ai/claude-code-*/claude $$exe; \
	fi
	CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 ANTHROPIC_BASE_URL=http://127.0.0.1:9 $(CLI) --version

# macOS: run the proxy at login with the system Python, restarting it if it stops.
install-launchagent:
	mkdir -p $(HOME)/Library/LaunchAgents $(HOME)/Library/Logs
	sed -e "s|/Users/YOU/claude-max-proxy|$(CURDIR)|g" -e "s|/Users/YOU|$(HOME)|g" \
		com.claude-max-api.plist > $(AGENT)
	$(LAUNCHCTL) unload $(AGENT) 2>/dev/null || true
	$(LAUNCHCTL) load $(AGENT)

uninstall-launchagent:
	$(LAUNCHCTL) unload $(AGENT) 2>/dev/null || true
	rm -f $(AGENT)

# Linux: a systemd user unit that runs the proxy with this Python, restarts it if
# it fails, logs to the journal, and reads CLAUDE_MAX_PROXY_* options from
# $(OPTIONS_FILE). `make systemd-unit` prints it; install-systemd writes and starts it.
# Paths are quoted, and a % in them doubled, as systemd reads them.
unit_path = $(subst %,%%,$(1))
CLAUDE_FOUND = $(shell command -v claude 2>/dev/null)
define SYSTEMD_UNIT
[Unit]
Description=claude-max-proxy: your Claude subscription as an OpenAI-compatible API

[Service]
ExecStart="$(call unit_path,$(shell $(PYTHON) -c 'import sys; print(sys.executable)'))" "$(call unit_path,$(CURDIR))/claude_max_proxy.py"
WorkingDirectory=$(call unit_path,$(CURDIR))
EnvironmentFile=-%h/.config/claude-max-proxy/env
# The user manager's PATH is bare: add where `claude` was found, and where npm usually puts it.
Environment="PATH=$(if $(CLAUDE_FOUND),$(call unit_path,$(patsubst %/,%,$(dir $(CLAUDE_FOUND)))):)%h/.local/bin:%h/.npm-global/bin:/usr/local/bin:/usr/bin:/bin"
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=5
# SIGTERM gives running requests 5 seconds, then stops every CLI.
TimeoutStopSec=20

[Install]
WantedBy=default.target
endef

systemd-unit:
	$(info $(SYSTEMD_UNIT))
	@:

# The folders first: make expands a recipe, $(file) included, before it runs any line of it.
install-systemd: | $(dir $(UNIT)) $(dir $(OPTIONS_FILE))
	$(file >$(UNIT),$(SYSTEMD_UNIT))
	[ -f $(OPTIONS_FILE) ] || printf '%s\n' '# claude-max-proxy options, as CLAUDE_MAX_PROXY_NAME=value lines (README: Options)' \
		'#CLAUDE_MAX_PROXY_API_KEY=a-long-random-key' > $(OPTIONS_FILE)
	chmod 600 $(OPTIONS_FILE)
	$(SYSTEMCTL) daemon-reload
	$(SYSTEMCTL) enable claude-max-proxy.service
	$(SYSTEMCTL) restart claude-max-proxy.service  # a changed unit takes effect now

$(dir $(UNIT)) $(dir $(OPTIONS_FILE)):
	mkdir -p $@

uninstall-systemd:
	$(SYSTEMCTL) disable --now claude-max-proxy.service 2>/dev/null || true
	rm -f $(UNIT)
	$(SYSTEMCTL) daemon-reload 2>/dev/null || true
