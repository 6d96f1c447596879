# The README's commands. Each target first runs scripts/setup, which installs what is missing.
SHELL := /bin/bash
CARGO ?= cargo
# The Vulkan loader warns when this is unset; any writable directory silences it.
export XDG_RUNTIME_DIR ?= /tmp

.PHONY: demo test test-native check-targets bench setup

setup:
	@scripts/setup

# The main job. Today: show the GPU portalora found and how fast its matmul runs there.
demo: setup
	$(CARGO) build --release
	./target/release/portalora info
	./target/release/portalora bench matmul

# Every test: kernels on the GPU (lavapipe without one), WGSL validation, model loading and the
# reference forward against transformers (tiny fixtures and the real SmolLM2 GGUF), the wasm32
# build, and compile checks of the DX12 (Windows) and Metal (macOS) paths. A missing adapter fails.
test:
	@scripts/setup --cross
	@scripts/fetch-assets
	$(MAKE) test-native check-targets

# The real-model parity tests need scripts/fetch-assets' files; here their absence fails.
test-native:
	PORTALORA_REQUIRE_GPU=1 PORTALORA_REQUIRE_ASSETS=1 $(CARGO) test
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
