use candle_core::{Device, Tensor};
use std::time::Instant;
use rlhf::model::{hf::load_pretrained, AttentionMask};
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    if let Ok(t) = std::env::var("GEMM_T") { gemm_common::gemm::set_threading_threshold(t.parse().unwrap()); }
    let pre = load_pretrained(std::path::Path::new(&dir), &Device::Cpu).unwrap();
    let m = &pre.model;
    let b = 8; let p = 32;
    for rep in 0..3 {
        let ids = Tensor::zeros((b, p), candle_core::DType::U32, &Device::Cpu).unwrap();
        let mut cache = m.new_cache();
        let mut km = vec![vec![1u8; p]; b];
        let t = Instant::now();
        let mask = AttentionMask::new(&km, p, &Device::Cpu).unwrap();
        let h = m.backbone.forward(&ids, &mask, Some(&mut cache)).unwrap();
        let _ = m.lm_head.forward(&h.narrow(1, p-1, 1).unwrap()).unwrap();
        let prefill = t.elapsed().as_secs_f64();
        let (mut tb, mut th, mut tv) = (0.0, 0.0, 0.0);
        for _ in 0..64 {
            for r in km.iter_mut() { r.push(1); }
            let ids = Tensor::zeros((b, 1), candle_core::DType::U32, &Device::Cpu).unwrap();
            let t = Instant::now();
            let mask = AttentionMask::new(&km, 1, &Device::Cpu).unwrap();
            let h = m.backbone.forward(&ids, &mask, Some(&mut cache)).unwrap();
            tb += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let l = m.lm_head.forward(&h).unwrap().squeeze(1).unwrap();
            th += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let _v: Vec<Vec<f32>> = l.to_vec2().unwrap();
            tv += t.elapsed().as_secs_f64();
        }
        println!("rep {rep}: prefill {:.1} ms, decode backbone {:.1} ms, head {:.1} ms, to_vec {:.1} ms", prefill*1e3, tb*1e3, th*1e3, tv*1e3);
    }
}
