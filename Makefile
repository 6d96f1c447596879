# The README's commands. Each target first runs scripts/setup, which installs what is missing.
SHELL := /bin/bash
CARGO ?= cargo
# The Vulkan loader warns when this is unset; any writable directory silences it.
export XDG_RUNTIME_DIR ?= /tmp

.PHONY: demo test test-native test-web check-targets bench setup

setup:
	@scripts/setup

CACHE ?= $(or $(PORTALORA_CACHE),$(HOME)/.cache/portalora)
MODEL = $(CACHE)/models/SmolLM2-135M-Instruct.Q4_1.gguf

# The main job: fine-tune SmolLM2-135M-Instruct with LoRA r = 8 on Hamlet, on the GPU (Mesa's
# lavapipe on a machine without one: about ten minutes on 2 cores), printing samples and the
# validation loss before and after, and where the adapter, log and loss curve are.
DEMO_OUT ?= $(CACHE)/demo-run
DEMO_STEPS ?= 70
demo: setup
	@scripts/fetch-assets "$(CACHE)"
	$(CARGO) build --release
	./target/release/portalora info
	./target/release/portalora train --model "$(MODEL)" --data "$(CACHE)/texts/hamlet_gut.txt" \
	  --method lora --rank 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
	  --lr 1e-3 --schedule cosine --warmup-steps 4 --steps $(DEMO_STEPS) --batch 2 --seq 128 \
	  --val-rows 8 --eval-every 10 --save-every 20 \
	  --prompt "HAMLET." --prompt "To be, or not to be" --sample-tokens 32 \
	  --out "$(DEMO_OUT)"

# Every test: kernels on the GPU (lavapipe without one), WGSL validation, model loading and the
# reference forward against transformers (tiny fixtures and the real SmolLM2 GGUF), the wasm32
# build, and compile checks of the DX12 (Windows) and Metal (macOS) paths. A missing adapter fails.
test:
	@scripts/setup --cross --web
	@scripts/fetch-assets "$(CACHE)"
	$(MAKE) test-native test-web check-targets

# The real-model parity tests need scripts/fetch-assets' files; here their absence fails.
test-native:
	PORTALORA_CACHE="$(CACHE)" PORTALORA_REQUIRE_GPU=1 PORTALORA_REQUIRE_ASSETS=1 $(CARGO) test
	$(CARGO) build --release
	./target/release/portalora info

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
