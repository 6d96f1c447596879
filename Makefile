# The README's commands. Each target first runs scripts/setup, which installs what is missing.
SHELL := /bin/bash
CARGO ?= cargo
# The Vulkan loader warns when this is unset; any writable directory silences it.
export XDG_RUNTIME_DIR ?= /tmp

.PHONY: demo test test-native check-targets bench setup

setup:
	@scripts/setup

CACHE ?= $(or $(PORTALORA_CACHE),$(HOME)/.cache/portalora)
MODEL = $(CACHE)/models/SmolLM2-135M-Instruct.Q4_1.gguf

# The main job. Today: the GPU portalora found, SmolLM2 generating and evaluated on the GPU, and
# the matmul benchmark. (Fine-tuning joins it with the trainer.)
demo: setup
	@scripts/fetch-assets "$(CACHE)"
	$(CARGO) build --release
	./target/release/portalora info
	./target/release/portalora generate --model "$(MODEL)" --prompt "The capital of France is" --max-tokens 12
	head -c 2600 "$(CACHE)/texts/hamlet_gut.txt" | tail -c 2200 > "$(CACHE)/hamlet-excerpt.txt"
	./target/release/portalora eval --model "$(MODEL)" --data "$(CACHE)/hamlet-excerpt.txt" --seq 128
	./target/release/portalora bench matmul --repeats 3

# Every test: kernels on the GPU (lavapipe without one), WGSL validation, model loading and the
# reference forward against transformers (tiny fixtures and the real SmolLM2 GGUF), the wasm32
# build, and compile checks of the DX12 (Windows) and Metal (macOS) paths. A missing adapter fails.
test:
	@scripts/setup --cross
	@scripts/fetch-assets "$(CACHE)"
	$(MAKE) test-native check-targets

# The real-model parity tests need scripts/fetch-assets' files; here their absence fails.
test-native:
	PORTALORA_CACHE="$(CACHE)" PORTALORA_REQUIRE_GPU=1 PORTALORA_REQUIRE_ASSETS=1 $(CARGO) test
	$(CARGO) build --release
	./target/release/portalora info

check-targets:
	$(CARGO) build --lib --target wasm32-unknown-unknown --no-default-features --features web
	$(CARGO) check --lib --target x86_64-pc-windows-msvc
	$(CARGO) check --lib --target aarch64-apple-darwin

# Matmul GFLOP/s next to numpy's on the same shapes (numpy is optional).
bench: setup
	$(CARGO) build --release
	python3 benches/compare_matmul.py ./target/release/portalora
