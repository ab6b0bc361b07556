//! Helpers the engine's examples share (`#[path]`-included; not an example of its own).

use peregrine_engine::EngineHandle;

/// The sum of every series of the metric `name` (all label sets) in the engine's /metrics text.
pub fn metric(e: &EngineHandle, name: &str) -> f64 {
    e.render_metrics()
        .lines()
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
