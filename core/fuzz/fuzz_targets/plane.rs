//! What the targets that run the whole data plane share: the pipeline they build (a small budget, a small
//! connection table, one consumer's key) and what every run of it must keep once finished.
// Each target compiles this file on its own.
#![allow(dead_code)]

use _core::metering::billing::MeterConfig;
use _core::metering::credentials::{key_digest, CredentialTable};
use _core::metering::subject::SubjectRule;
use _core::pipeline::{Pipeline, PipelineConfig};
use _core::tcp::reassembly::ReassemblyLimits;

/// The pipeline's memory budget: it must hold no more than this at a batch's end.
pub const BUDGET: usize = 64 << 10;
/// alice's key
pub const KEY: &[u8] = b"secret-key-1";

pub fn pipeline(rule: SubjectRule) -> Pipeline {
    Pipeline::new(PipelineConfig {
        ports: vec![8000],
        limits: ReassemblyLimits { max_connections: 4, max_pending_bytes_per_stream: 4096, idle_timeout: 5.0 },
        response_timeout: 2.0,
        max_head_bytes: 1024,
        max_memory: BUDGET,
        meter: MeterConfig { source: "fuzz".to_string(), rule, max_held: 8 },
        share: 0,
        shares: 1,
    })
}

/// The credential table, with alice's key.
pub fn load_credentials(pipeline: &mut Pipeline) {
    let table = CredentialTable::new([(key_digest(KEY), Some("alice".to_string()), "c-alice".to_string(), None)]);
    pipeline.meter.set_credentials(Some(table));
}

/// A batch ends: what it finished goes to `out`, and the state is within the budget.
pub fn end_batch(pipeline: &mut Pipeline, out: &mut Vec<u8>) {
    pipeline.end_batch(out);
    assert!(pipeline.held_bytes() <= BUDGET, "{} bytes held", pipeline.held_bytes());
}

/// The run is over: no internal error was counted, and each line emitted is one event object; the lines.
pub fn finish(pipeline: &mut Pipeline, out: &mut Vec<u8>) -> Vec<Vec<u8>> {
    pipeline.finish(out);
    let counters = pipeline.counters();
    assert_eq!(counters.iter().find(|(name, _)| *name == "internal_errors").map(|(_, v)| *v), Some(0));
    let lines: Vec<Vec<u8>> = out.split(|&b| b == b'\n').filter(|line| !line.is_empty()).map(<[u8]>::to_vec).collect();
    for line in &lines {
        assert!(line.starts_with(b"{\"id\":\"") && line.ends_with(b"}}"), "{}", String::from_utf8_lossy(line));
    }
    lines
}
