//! A GPU context lost to a real kernel fault (a sticky CUDA error): the CUDA backend's health
//! check reports it, and the engine then fails the request in flight and refuses new ones
//! (engine_mock.rs covers the engine's side with an injected failure on any machine). A test
//! binary of its own: the fault poisons the process's context for good, so no other test may
//! share the process. Without a GPU it says `skipped:`; scripts/gpu-check.sh runs it with
//! PEREGRINE_REQUIRE_GPU=1, where it must run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use peregrine_core::backend::Backend;
use peregrine_core::SamplingParams;
use peregrine_cuda::device::probe_for_tests;
use peregrine_cuda::{probe, CudaModel, Kernels};
use peregrine_engine::*;
use peregrine_model::tokenizer::Tokenizer;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");

fn request(id: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_tokens: (0..9).map(|i| 10 + i * 7).collect(),
        sampling: SamplingParams::greedy(),
        stop: StopParams { max_tokens: 6, ignore_eos: true, skip_special_tokens: true, ..Default::default() },
        prompt_logprobs: None,
        priority: 0,
        arrival: Instant::now(),
        cache_salt: None,
    }
}

/// The request's generated ids, or its error.
fn outcome(mut rx: RequestStream) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            RequestEvent::Delta { token_ids, .. } => ids.extend(token_ids),
            RequestEvent::Finished { .. } => return Ok(ids),
            RequestEvent::Error(e) => return Err(e),
            RequestEvent::PromptLogprobs(_) => {}
        }
    }
    Err("the stream closed without an end".into())
}

#[test]
fn a_kernel_fault_fails_the_engine_and_says_why() {
    let Some(gpu) = probe_for_tests(0) else { return };
    let spec = peregrine_model::config::load_spec(Path::new(FIX)).expect("fixture config");
    let mut model = CudaModel::synthetic(gpu, &spec, 5).expect("synthetic model");
    model.check_health().expect("a fresh context is healthy");
    let tok = Arc::new(Tokenizer::from_file(&Path::new(FIX).join("tokenizer.json")).unwrap());
    let cfg = EngineConfig { max_num_seqs: 4, max_num_batched_tokens: 64, max_model_len: 128, kv_cache_memory_bytes: 4 << 20, gpu_memory_utilization: None, block_size: 4, max_waiting: 16, enable_prefix_caching: false, speculative_block_size: None, model_name: None, overlap_steps: true, speculation: SpeculationMode::Always, kv_cache_dtype: None };
    let e = start_engine(Box::new(model), tok, cfg).unwrap();
    let served = outcome(e.submit(request("before")).unwrap()).expect("the engine serves before the fault");
    assert_eq!(served.len(), 6);
    assert_eq!(e.failure(), None);

    // The fault: a second handle on the same (primary) context launches a GEMV whose output
    // lies at an address nothing maps.
    let g2 = probe(0).expect("a second handle on GPU 0");
    let k = Kernels::load(&g2).expect("kernels");
    let (n, kd) = (128, 128);
    let w = g2.stream.clone_htod(&vec![0x3f80u16; n * kd]).unwrap();
    let x = g2.stream.clone_htod(&vec![1f32; kd]).unwrap();
    // SAFETY: deliberately not an allocation: the kernel's stores fault, which is the point; the
    // slice is leaked below so that nothing frees it.
    let mut y = unsafe { g2.stream.upgrade_device_ptr::<f32>(0x10000, n) };
    k.gemv_bf16(&w, &x, &mut y, n, kd, 1).expect("the launch itself is accepted");
    let fault = g2.stream.synchronize().expect_err("a store to an unmapped address faults");
    let _ = y.leak();
    eprintln!("injected fault: {fault}");

    // The next request fails, the engine names the lost context, and later submits are refused.
    let err = outcome(e.submit(request("after")).unwrap()).expect_err("a request on a lost context fails");
    let why = e.failure().expect("the engine has failed");
    assert!(why.contains("GPU context is lost") && why.contains("restart the server"), "{why}");
    assert_eq!(err, why, "the request carries the failure's message");
    match e.submit(request("later")) {
        Err(SubmitError::BackendFailed(m)) => assert_eq!(m, why),
        Err(other) => panic!("refused for the wrong reason: {other:?}"),
        Ok(_) => panic!("a failed engine accepted a request"),
    }
    // Nothing is left running or holding KV blocks (the stats are published after the step).
    let t0 = Instant::now();
    while (e.stats().running, e.stats().waiting, e.stats().free_full_blocks) != (0, 0, e.stats().total_full_blocks) {
        assert!(t0.elapsed().as_secs() < 10, "requests or KV blocks left behind: {:?}", e.stats());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
