//! Shared test helpers.
#![allow(dead_code)]

use portalora::gpu::Context;

/// Opens the GPU context. Without an adapter the test is skipped with a loud message, unless
/// `PORTALORA_REQUIRE_GPU=1` (set by `make test` and CI), where a missing adapter fails.
pub fn context() -> Option<Context> {
    match pollster::block_on(Context::new()) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            if std::env::var("PORTALORA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("PORTALORA_REQUIRE_GPU=1 but no GPU context: {e}");
            }
            eprintln!("SKIPPED (no GPU adapter; set PORTALORA_REQUIRE_GPU=1 to fail instead): {e}");
            None
        }
    }
}
