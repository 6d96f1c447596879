//! `portalora merge`.

use std::path::Path;

use portalora::gpu::Context;
use portalora::model::export::{read_back_site_weights, write_hf_folder};
use portalora::outdir;
use portalora::train::model_with_adapter;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `portalora merge`: the base with the adapter's ΔW added, as a Hugging Face folder written
/// beside `out` and renamed into place. `out` is never the model or the adapter.
pub fn merge(ctx: &Context, model: &Path, adapter: &Path, out: &Path, overwrite: bool) -> Res<()> {
    outdir::check(out, &[model, adapter], overwrite, "pick another --out, or replace it whole with --overwrite")?;
    let mut weights = crate::load_model(model)?;
    let mut m = model_with_adapter(ctx, &weights, 1, 2, adapter)?;
    m.merge(ctx)?;
    read_back_site_weights(ctx, &m, &mut weights)?;
    outdir::write_dir_atomic(out, |tmp| -> Res<()> {
        write_hf_folder(&weights, tmp)?;
        Ok(())
    })?;
    outln!("merged {} into {} and wrote {}", adapter.display(), model.display(), out.display());
    Ok(())
}
