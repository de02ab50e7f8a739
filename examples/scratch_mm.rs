use candle_core::{Device, Tensor};
use std::time::Instant;
fn bench(name: &str, f: impl Fn() -> Tensor) {
    f();
    let t = Instant::now();
    let n = 50;
    for _ in 0..n { f(); }
    println!("{name}: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
}
fn main() {
    let d = Device::Cpu;
    for (m, k, n) in [(8, 256, 8192), (8, 256, 768), (8, 768, 50257), (8, 768, 2304), (256, 256, 768)] {
        let x = Tensor::randn(0f32, 1., (m, k), &d).unwrap();
        let w = Tensor::randn(0f32, 1., (n, k), &d).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        println!("m={m} k={k} n={n}");
        bench("  x @ w.t()   ", || x.matmul(&w.t().unwrap()).unwrap());
        bench("  x @ wt(contig)", || x.matmul(&wt).unwrap());
        bench("  w @ x.t()   ", || w.matmul(&x.t().unwrap()).unwrap());
    }
}
