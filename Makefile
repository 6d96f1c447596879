# The README's commands. Each target first runs scripts/setup, which installs what is missing.
SHELL := /bin/bash
CARGO ?= cargo
# The Vulkan loader warns when this is unset; any writable directory silences it.
export XDG_RUNTIME_DIR ?= /tmp

.PHONY: demo test test-native test-coop test-web test-web-e2e check-targets bench setup web build-web

setup:
	@scripts/setup

CACHE ?= $(or $(PORTALORA_CACHE),$(HOME)/.cache/portalora)
# The demo's model: smollm2 (SmolLM2-135M-Instruct, Q4_1) or gemma3-270m (Gemma-3-270M base,
# Q4_K_M; Gemma's terms of use apply, see the file beside it in the cache).
DEMO_MODEL ?= smollm2
MODEL_smollm2 = $(CACHE)/models/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_gemma3-270m = $(CACHE)/models/gemma-3-270m-q4_k_m.gguf
MODEL = $(MODEL_$(DEMO_MODEL))

# The main job: an instruct fine-tune of SmolLM2-135M-Instruct, LoRA r = 8 on every projection,
# on conversations built from Hamlet (scripts/chat-demo-data: the user gives two speeches of a
# scene, the assistant answers with the next), rendered with the model's chat template, the loss
# on the assistant's turns only; on the GPU (Mesa's lavapipe on a machine without one: about six
# minutes on 2 cores), printing a chat sample and the validation loss before and after, and where
# the adapter, log and loss curve are. DEMO_MODEL=gemma3-270m (a base model, without a chat
# template) trains on the play's text instead. The demo's folder is its own: each run replaces it
# (--overwrite).
DEMO_OUT ?= $(CACHE)/demo-run$(if $(filter-out smollm2,$(DEMO_MODEL)),-$(DEMO_MODEL))
DEMO_STEPS ?= 70
CHAT_DATA = $(CACHE)/texts/hamlet_chat.jsonl
CHAT_PROMPT = $$(printf 'Continue this scene from Hamlet:\n\nMar.\nWhat, has this thing appear'"'"'d again to-night?\n\nBer.\nI have seen nothing.')
DATA_smollm2 = --data "$(CHAT_DATA)" --prompt "$(CHAT_PROMPT)"
DATA_gemma3-270m = --data "$(CACHE)/texts/hamlet_gut.txt" --prompt "HAMLET." --prompt "To be, or not to be"
demo: setup
	@[ -n "$(MODEL)" ] || { echo "DEMO_MODEL=$(DEMO_MODEL): use smollm2 or gemma3-270m"; exit 2; }
	@scripts/fetch-assets "$(CACHE)"
	scripts/chat-demo-data "$(CACHE)/texts/hamlet_gut.txt" "$(CHAT_DATA)"
	$(CARGO) build --release
	./target/release/portalora info
	./target/release/portalora train --model "$(MODEL)" $(DATA_$(DEMO_MODEL)) \
	  --method lora --rank 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
	  --lr 1e-3 --schedule cosine --warmup-steps 4 --steps $(DEMO_STEPS) --batch 2 --seq 128 \
	  --val-rows 8 --eval-every 10 --save-every 20 --sample-tokens 32 \
	  --out "$(DEMO_OUT)" --overwrite

# Every test: kernels on the GPU (lavapipe without one), WGSL validation, model loading and the
# reference forward against transformers (tiny fixtures and the real SmolLM2 GGUF), the adapters
# against PEFT, fine-tuning runs, the browser tests in headless Chromium (wasm-bindgen-test and the
# demo page end to end), and compile checks of the DX12 (Windows) and Metal (macOS) paths. A
# missing adapter fails. First the five longest files and functions of src/ (scripts/longest),
# which fails when one is over the project's limits (600 and 80 lines; docs/ARCHITECTURE.md).
test:
	@scripts/setup --cross --web
	@scripts/fetch-assets "$(CACHE)"
	python3 scripts/longest src
	$(MAKE) test-native test-coop test-web test-web-e2e check-targets

# The real-model parity tests need scripts/fetch-assets' files; here their absence fails.
test-native:
	PORTALORA_CACHE="$(CACHE)" PORTALORA_REQUIRE_GPU=1 PORTALORA_REQUIRE_ASSETS=1 $(CARGO) test
	$(CARGO) build --release
	./target/release/portalora info

# The cooperative-matrix matmul path (tests/coop.rs) on Mesa's lavapipe >= 26.1, which offers
# cooperative matrices on the CPU: Debian trixie-backports' driver with its own C library,
# unpacked beside the system's by scripts/lavapipe-coop (nothing is installed) and run through its
# `run` wrapper. There, an adapter without them fails; a machine that cannot run it (not Linux
# x86_64 with apt-get) skips with a message.
test-coop:
	@scripts/lavapipe-coop "$(CACHE)/lavapipe-coop" >/dev/null || { rc=$$?; \
	  if [ $$rc = 3 ]; then echo "test-coop: SKIPPED (needs Linux x86_64 with apt-get)"; exit 0; fi; exit $$rc; }; \
	PORTALORA_CACHE="$(CACHE)" PORTALORA_REQUIRE_GPU=1 PORTALORA_REQUIRE_ASSETS=1 PORTALORA_REQUIRE_COOP=1 \
	  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$(CACHE)/lavapipe-coop/run" $(CARGO) test --release --test coop

# The browser tests (tests/web.rs) in headless Chromium's WebGPU, through wasm-bindgen-test with
# chromedriver (webdriver.json holds Chromium's flags).
test-web:
	CHROMEDRIVER=/usr/bin/chromedriver CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  WASM_BINDGEN_TEST_TIMEOUT=300 \
	  $(CARGO) test --target wasm32-unknown-unknown --no-default-features --features web --test web

check-targets:
	$(CARGO) build --lib --target wasm32-unknown-unknown --no-default-features --features web
	$(CARGO) check --lib --target x86_64-pc-windows-msvc
	$(CARGO) check --lib --target aarch64-apple-darwin

# Matmul GFLOP/s next to numpy's on the same shapes (numpy is optional).
bench: setup
	$(CARGO) build --release
	python3 benches/compare_matmul.py ./target/release/portalora

# The browser demo: builds the wasm module (cargo, wasm-bindgen-cli at the crate's exact version,
# wasm-opt from the npm package binaryen), puts the bundled tiny model beside the page, and serves
# web/ on 127.0.0.1 (WebGPU needs a secure context: localhost is one).
WEB_PORT ?= 8000
NODE_DIR = $(CACHE)/node
WASM = target/wasm32-unknown-unknown/release/portalora.wasm
web: build-web
	@echo "portalora: serving web/ at http://127.0.0.1:$(WEB_PORT)/  (Ctrl-C stops)"
	cd web && python3 -m http.server $(WEB_PORT) --bind 127.0.0.1

build-web:
	@scripts/setup --web
	$(CARGO) build --lib --release --target wasm32-unknown-unknown --no-default-features --features web
	wasm-bindgen --target web --no-typescript --out-dir web/pkg $(WASM)
	@[ -x "$(NODE_DIR)/node_modules/.bin/wasm-opt" ] || npm install --silent --prefix "$(NODE_DIR)" binaryen@132.0.0 playwright-core@1.65.1
	"$(NODE_DIR)/node_modules/.bin/wasm-opt" -O2 --enable-bulk-memory --enable-nontrapping-float-to-int \
	  --enable-sign-ext --enable-mutable-globals --enable-reference-types web/pkg/portalora_bg.wasm -o web/pkg/portalora_bg.wasm
	mkdir -p web/models/tiny
	cp tests/fixtures/tiny_gpt2/config.json tests/fixtures/tiny_gpt2/model.safetensors tests/fixtures/tiny_gpt2/tokenizer.json web/models/tiny/
	@ls -l web/pkg/portalora_bg.wasm

# The page end to end in headless Chromium (tests/web/e2e.mjs, playwright-core): every method
# trains the bundled tiny model, the chart is drawn, text is generated, the adapter downloads and
# parses; a browser without WebGPU gets a readable error. Screenshot: target/web-e2e.png.
test-web-e2e: build-web
	PLAYWRIGHT_CORE="$(NODE_DIR)/node_modules/playwright-core" node tests/web/e2e.mjs
