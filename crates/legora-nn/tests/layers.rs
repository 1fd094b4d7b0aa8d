//! legora-nn against references: PEFT/torch fixtures (made by
//! `tests/fixtures/make_nn_fixtures.py`), loop-vs-fast paths, merge, optimizer steps.
#![allow(non_snake_case)]

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use legora_nn::*;
use safetensors::SafeTensors;

type Inner = Flex;
type B = Autodiff<Inner>;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../tests/fixtures/nn/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn get<Bk: Backend, const D: usize>(st: &SafeTensors, key: &str) -> Tensor<Bk, D> {
    let v = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("fixture lacks {key}"));
    let data: Vec<f32> = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::from_data(
        TensorData::new(data, v.shape().to_vec()),
        &Default::default(),
    )
}

fn vals<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// max |a-b| <= tol · max(|b|_∞, tiny): a tolerance relative to the tensor's scale.
fn assert_close(name: &str, a: &[f32], b: &[f32], tol: f32) {
    legora_testing::assert_close(name, a, b, tol, 1e-12);
}

#[test]
fn lora_linear_matches_peft_forward_and_gradients() {
    let bytes = fixture("lora_layer.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for r in [1usize, 8, 16] {
        for rs in [false, true] {
            let k = format!("r{r}_rs{}", rs as u8);
            let w: Tensor<B, 2> = get(&st, &format!("{k}.weight"));
            let bias: Tensor<B, 1> = get(&st, &format!("{k}.bias"));
            let [d_out, d_in] = w.dims();
            let spec = AdapterSpec::new(r, 16.0).with_rslora(rs);
            let scaling: Tensor<B, 1> = get(&st, &format!("{k}.scaling"));
            assert_close(
                &format!("{k} scaling"),
                &[spec.scaling() as f32],
                &vals(scaling),
                1e-7,
            );
            let adapter = LoraAdapter::from_tensors(
                get(&st, &format!("{k}.lora_A")),
                get(&st, &format!("{k}.lora_B")),
                &spec,
                d_in,
                d_out,
            )
            .unwrap();
            let mut layer = LoraLinear::new(w, Some(bias)).unwrap();
            layer.insert_adapter("default", adapter).unwrap();

            let x: Tensor<B, 3> = get::<B, 3>(&st, &format!("{k}.x")).require_grad();
            let g: Tensor<B, 3> = get(&st, &format!("{k}.g"));
            let y = layer.forward(x.clone());
            assert_close(
                &format!("{k} y"),
                &vals(y.clone()),
                &vals(get::<B, 3>(&st, &format!("{k}.y"))),
                1e-5,
            );
            let grads = (y * g).sum().backward();
            let a = layer.adapter("default").unwrap();
            let gA = a.lora_A.val().grad(&grads).expect("A has a gradient");
            let gB = a.lora_B.val().grad(&grads).expect("B has a gradient");
            let gx = x.grad(&grads).expect("x has a gradient");
            assert_close(
                &format!("{k} dA"),
                &vals(gA),
                &vals(get::<Inner, 2>(&st, &format!("{k}.grad_A"))),
                1e-5,
            );
            assert_close(
                &format!("{k} dB"),
                &vals(gB),
                &vals(get::<Inner, 2>(&st, &format!("{k}.grad_B"))),
                1e-5,
            );
            assert_close(
                &format!("{k} dx"),
                &vals(gx),
                &vals(get::<Inner, 3>(&st, &format!("{k}.grad_x"))),
                1e-5,
            );
            assert!(
                layer.weight.val().grad(&grads).is_none(),
                "frozen base got a gradient"
            );
        }
    }
}

#[test]
fn router_losses_match_torch_formula() {
    let bytes = fixture("router.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let x: Tensor<B, 2> = get(&st, "x");
    let mask: Tensor<B, 1> = get(&st, "mask");
    let g: Tensor<B, 2> = get(&st, "g");
    for (name, strategy) in [
        ("topk", RoutingStrategy::TopK),
        ("switch", RoutingStrategy::Switch),
        ("dense", RoutingStrategy::Dense),
    ] {
        let cfg = RouterConfig::new(4)
            .with_strategy(strategy)
            .with_top_k(2)
            .with_aux_loss(0.01)
            .with_z_loss(0.001);
        let router = Router::from_weight(&cfg, get(&st, &format!("{name}.weight"))).unwrap();
        let out = router.forward(x.clone(), Some(mask.clone()));
        let fx = |s: &str| vals(get::<B, 1>(&st, &format!("{name}.{s}")));
        assert_close(
            &format!("{name} gates"),
            &vals(out.gates.clone()),
            &vals(get::<B, 2>(&st, &format!("{name}.gates"))),
            1e-5,
        );
        assert_close(
            &format!("{name} aux"),
            &vals(out.aux_loss.clone()),
            &fx("aux"),
            1e-5,
        );
        assert_close(
            &format!("{name} z"),
            &vals(out.z_loss.clone()),
            &fx("z"),
            1e-5,
        );
        assert_close(
            &format!("{name} load"),
            &vals(out.load.clone()),
            &fx("load"),
            1e-6,
        );
        assert_close(
            &format!("{name} importance"),
            &vals(out.importance.clone()),
            &fx("importance"),
            1e-5,
        );
        // gradients through gather/scatter/softmax/logsumexp match torch autograd
        let total =
            out.aux_loss.clone() + out.z_loss.clone() + (out.gates.clone() * g.clone()).sum();
        let grads = total.backward();
        let gw = router.weight.val().grad(&grads).unwrap();
        assert_close(
            &format!("{name} dW"),
            &vals(gw),
            &vals(get::<Inner, 2>(&st, &format!("{name}.grad_weight"))),
            1e-5,
        );

        let gates = vals(out.gates);
        let probs = vals(out.probs);
        for t in 0..12 {
            let row = &gates[t * 4..t * 4 + 4];
            let nonzero = row.iter().filter(|v| **v > 0.0).count();
            match strategy {
                RoutingStrategy::TopK => {
                    assert_eq!(nonzero, 2);
                    assert!(
                        (row.iter().sum::<f32>() - 1.0).abs() < 1e-6,
                        "top-k gates sum to 1"
                    );
                }
                RoutingStrategy::Switch => assert_eq!(nonzero, 1),
                RoutingStrategy::Dense => {
                    assert_close("dense = softmax", row, &probs[t * 4..t * 4 + 4], 0.0)
                }
            }
        }
    }
}

fn randn<const D: usize>(shape: [usize; D], std: f64) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default())
}

/// A MoE layer with random (non-zero) experts of the given ranks.
fn moe(ranks: &[usize], d_in: usize, d_out: usize) -> MoeLinear<B> {
    let mut m = MoeLinear::new(randn([d_out, d_in], 0.1), Some(randn([d_out], 0.1))).unwrap();
    for (i, &r) in ranks.iter().enumerate() {
        let spec =
            AdapterSpec::new(r, 2.0 * r as f64 + i as f64).with_init(InitLoraWeights::Random);
        m.add_expert(&format!("e{i}"), &spec).unwrap();
    }
    m
}

#[test]
fn moe_fast_path_equals_loop_reference() {
    // seeded: a tolerance failure reproduces
    Inner::seed(&Default::default(), 11);
    let (d_in, d_out) = (24, 18);
    for e in [1usize, 3, 8] {
        let ranks: Vec<usize> = (0..e).map(|i| [4, 1, 8, 2][i % 4]).collect();
        let mut layer = moe(&ranks, d_in, d_out);
        for k in [1usize, 2, e] {
            if k > e {
                continue;
            }
            let cfg = RouterConfig::new(e).with_top_k(k);
            layer.router = Some(Router::init(&cfg, d_in, &Default::default()).unwrap());
            let x = randn([3, 7, d_in], 1.0).require_grad();
            // one graph at a time: a backward pass consumes the graph it runs on,
            // including leaves shared with a graph built before it
            let (fast, _) = layer
                .forward(x.clone(), &Experts::Router { mask: None })
                .unwrap();
            let y_fast = vals(fast.clone());
            let gf = fast.sum().backward();
            let router = layer.router.as_ref().unwrap();
            let gates = router.forward(x.clone().reshape([21, d_in]), None).gates;
            let slow = reference::moe_loop(&layer, x.clone(), gates).unwrap();
            assert_close(
                &format!("E={e} k={k} y"),
                &y_fast,
                &vals(slow.clone()),
                1e-5,
            );
            // gradients of every expert, and of x through the router too, agree
            let gs = slow.sum().backward();
            assert_close(
                "dx",
                &vals(x.grad(&gf).unwrap()),
                &vals(x.grad(&gs).unwrap()),
                1e-5,
            );
            for ex in &layer.experts {
                let (a, b) = (ex.lora_A.val(), ex.lora_B.val());
                assert_close(
                    "dA",
                    &vals(a.grad(&gf).unwrap()),
                    &vals(a.grad(&gs).unwrap()),
                    1e-5,
                );
                assert_close(
                    "dB",
                    &vals(b.grad(&gf).unwrap()),
                    &vals(b.grad(&gs).unwrap()),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn task_routed_equals_each_row_through_its_own_expert() {
    // Equal ranks take the fused routed kernel, unequal ones the gated stacked path.
    for ranks in [[4, 4, 4], [4, 2, 8]] {
        task_routed_rows_match_single_adapters(&ranks);
    }
}

fn task_routed_rows_match_single_adapters(ranks: &[usize]) {
    let (d_in, d_out) = (16, 12);
    let layer = moe(ranks, d_in, d_out);
    let ids = [2usize, 0, 1, 2];
    let x = randn([4, 5, d_in], 1.0);
    let y = vals(task_routed(&layer, x.clone(), &ids).unwrap());
    assert!(
        layer.forward(x.clone(), &Experts::Single(3)).is_err(),
        "no expert 3"
    );
    for (row, &id) in ids.iter().enumerate() {
        // the same expert alone, as a single LoraLinear
        let mut single =
            LoraLinear::new(layer.weight.val(), layer.bias.as_ref().map(|b| b.val())).unwrap();
        let ex = &layer.experts[id];
        let copy =
            LoraAdapter::from_tensors(ex.lora_A.val(), ex.lora_B.val(), &ex.spec(), d_in, d_out)
                .unwrap();
        single.insert_adapter("only", copy).unwrap();
        let xr = x.clone().narrow(0, row, 1);
        let want = vals(single.forward(xr.clone()));
        // the single-expert path (every row on one task) gives the same
        assert_close(
            &format!("row {row} alone"),
            &vals(layer.forward(xr, &Experts::Single(id)).unwrap().0),
            &want,
            1e-5,
        );
        let n = 5 * d_out;
        assert_close(
            &format!("row {row}"),
            &y[row * n..(row + 1) * n],
            &want,
            1e-5,
        );
    }
    assert!(matches!(
        task_routed(&layer, x, &[0, 1, 3, 0]),
        Err(NnError::Config(ConfigError::InvalidConfig { .. }))
    ));
}

/// Row `b` of `x [batch, seq, in]` through expert `ids[b]`.
fn task_routed(layer: &MoeLinear<B>, x: Tensor<B, 3>, ids: &[usize]) -> Result<Tensor<B, 3>> {
    let seq = x.dims()[1];
    let ids: Vec<Option<usize>> = ids.iter().map(|&i| Some(i)).collect();
    Ok(layer.forward(x, &Experts::per_batch_row(&ids, seq))?.0)
}

#[test]
fn optimizer_step_moves_only_adapters_and_router() {
    let (d_in, d_out) = (16, 12);
    let mut layer = moe(&[4, 4], d_in, d_out);
    let cfg = RouterConfig::new(2).with_top_k(1);
    layer.router = Some(Router::init(&cfg, d_in, &Default::default()).unwrap());
    let base_before = layer.weight.val().into_data();
    let bias_before = layer.bias.as_ref().unwrap().val().into_data();
    let a_before = vals(layer.experts[0].lora_A.val());
    let r_before = vals(layer.router.as_ref().unwrap().weight.val());

    let report = trainable_parameters(&layer);
    // base 12·16 + 12 frozen; experts 2·(4·16 + 12·4); router 2·16
    assert_eq!(report.trainable, 2 * (4 * 16 + 12 * 4) + 2 * 16);
    assert_eq!(report.total, report.trainable + 12 * 16 + 12);
    assert!(
        report
            .to_string()
            .starts_with("trainable params: 256 || all params: 460 || trainable%: 55.65"),
        "{report}"
    );

    let mut optim = AdamWConfig::new().init();
    let x = randn([2, 3, d_in], 1.0);
    let (y, out) = layer.forward(x, &Experts::Router { mask: None }).unwrap();
    let out = out.expect("the slot routed itself");
    let loss = y.powi_scalar(2).mean() + out.aux_loss;
    let grads = GradientsParams::from_grads(loss.backward(), &layer);
    let layer = optim.step(1e-2, layer, grads);

    assert_eq!(
        layer.weight.val().into_data(),
        base_before,
        "base weight must be bit-identical"
    );
    assert_eq!(layer.bias.as_ref().unwrap().val().into_data(), bias_before);
    assert_ne!(
        vals(layer.experts[0].lora_A.val()),
        a_before,
        "expert A moved"
    );
    assert_ne!(
        vals(layer.router.as_ref().unwrap().weight.val()),
        r_before,
        "router moved"
    );
    // the inference copy keeps the same values
    let valid = layer.valid();
    assert_eq!(valid.weight.val().into_data(), base_before);
}

#[test]
fn merge_unmerge_and_adapter_management() {
    let (d_in, d_out) = (20, 10);
    let w = randn([d_out, d_in], 0.2);
    let w0 = vals(w.clone());
    let mut layer = LoraLinear::new(w, Some(randn([d_out], 0.1))).unwrap();
    let random = |r| AdapterSpec::new(r, 8.0).with_init(InitLoraWeights::Random);
    layer.add_adapter("a", &random(4)).unwrap();
    layer.add_adapter("b", &random(2)).unwrap();
    assert_eq!(layer.active_adapters(), ["a"]);
    assert!(matches!(
        layer.add_adapter("a", &random(1)),
        Err(NnError::DuplicateAdapter { .. })
    ));
    layer.set_adapter(&["a", "b"]).unwrap();
    let x = randn([6, d_in], 1.0);
    let y = vals(layer.forward(x.clone()));

    layer.merge().unwrap();
    assert_eq!(layer.merged_adapters(), ["a", "b"]);
    assert_close("merged forward", &vals(layer.forward(x.clone())), &y, 1e-5);
    assert!(
        layer.delete_adapter("a").is_err(),
        "cannot delete a merged adapter"
    );
    layer.unmerge();
    let back = vals(layer.weight.val());
    let max_diff = back
        .iter()
        .zip(&w0)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_diff <= 1e-6, "unmerge restores the base: {max_diff}");

    layer.disable_adapters();
    let base_only = vals(layer.forward(x.clone()));
    let (wb, bb) = (layer.weight.val(), layer.bias.as_ref().unwrap().val());
    let want = vals(x.clone().matmul(wb.transpose()) + bb.unsqueeze_dim(0));
    assert_close("disabled = base", &base_only, &want, 1e-6);
    layer.enable_adapters();

    // "cat" is exactly Σ wᵢ ΔWᵢ; "linear" with one adapter is exactly w·ΔW
    layer
        .add_weighted_adapter(
            &["a", "b"],
            &[0.7, -0.3],
            "cat",
            Combination::Cat,
            &MergeOptions::default(),
        )
        .unwrap();
    let da = vals(layer.adapter("a").unwrap().delta_weight());
    let db = vals(layer.adapter("b").unwrap().delta_weight());
    let want: Vec<f32> = da.iter().zip(&db).map(|(a, b)| 0.7 * a - 0.3 * b).collect();
    assert_eq!(layer.adapter("cat").unwrap().rank(), 6);
    assert_close(
        "cat",
        &vals(layer.adapter("cat").unwrap().delta_weight()),
        &want,
        1e-5,
    );
    layer
        .add_weighted_adapter(
            &["a"],
            &[-0.5],
            "lin",
            Combination::Linear,
            &MergeOptions::default(),
        )
        .unwrap();
    let want: Vec<f32> = da.iter().map(|a| -0.5 * a).collect();
    assert_close(
        "linear",
        &vals(layer.adapter("lin").unwrap().delta_weight()),
        &want,
        1e-5,
    );
    let e = layer
        .add_weighted_adapter(
            &["a", "b"],
            &[1.0, 1.0],
            "x",
            Combination::Linear,
            &MergeOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("combination_type"), "{e}");

    layer.delete_adapter("b").unwrap();
    assert_eq!(layer.adapter_names(), ["a", "cat", "lin"]);
    assert!(matches!(
        layer.set_adapter(&["b"]),
        Err(NnError::UnknownAdapter { .. })
    ));

    // merge_and_unload equals base + adapter
    layer.set_adapter(&["a"]).unwrap();
    let y = vals(layer.forward(x.clone()));
    let (mw, mb) = layer.merge_and_unload().unwrap();
    let merged = vals(x.matmul(mw.transpose()) + mb.unwrap().unsqueeze_dim(0));
    assert_close("merge_and_unload", &merged, &y, 1e-5);
}

#[test]
fn new_adapter_is_an_exact_no_op() {
    let w = randn([8, 6], 0.3);
    let mut layer = LoraLinear::new(w.clone(), None).unwrap();
    let x = randn([4, 6], 1.0);
    let base = vals(layer.forward(x.clone()));
    for (name, init) in [
        ("d", InitLoraWeights::Default),
        ("g", InitLoraWeights::Gaussian),
    ] {
        layer
            .add_adapter(name, &AdapterSpec::new(3, 6.0).with_init(init))
            .unwrap();
        layer.set_adapter(&[name]).unwrap();
        assert_eq!(vals(layer.forward(x.clone())), base);
    }
}

#[test]
fn bad_shapes_and_configs_are_typed_errors() {
    let spec = AdapterSpec::new(4, 8.0);
    let e = LoraAdapter::<B>::from_tensors(randn([4, 10], 1.0), randn([6, 3], 1.0), &spec, 10, 6)
        .unwrap_err();
    assert_eq!(
        e,
        NnError::ShapeMismatch {
            tensor: "lora_B.weight".into(),
            expected: vec![6, 4],
            found: vec![6, 3]
        }
    );
    let e =
        LoraAdapter::<B>::init(&AdapterSpec::new(0, 8.0), 4, 4, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("`r`"), "{e}");
    let e = LoraAdapter::<B>::init(&spec.with_dropout(1.5), 4, 4, &Default::default()).unwrap_err();
    assert!(
        e.to_string().contains("lora_dropout") && e.to_string().contains("1.5"),
        "{e}"
    );
    let e = RouterConfig::new(3).with_top_k(4).validate().unwrap_err();
    assert!(
        e.to_string().contains("top_k") && e.to_string().contains('4'),
        "{e}"
    );
    let e = "mixtral-ish".parse::<RoutingStrategy>().unwrap_err();
    assert!(
        e.to_string().contains("routing_strategy") && e.to_string().contains("mixtral-ish"),
        "{e}"
    );
    let e =
        serde_json::from_str::<RouterConfig>(r#"{"num_experts": 4, "routing_strategy": "nope"}"#)
            .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    let ok: RouterConfig = serde_json::from_str(
        r#"{"num_experts": 4, "routing_strategy": "mixlora-switch", "router_z_loss_coef": 0.001}"#,
    )
    .unwrap();
    assert_eq!(ok.routing_strategy, RoutingStrategy::Switch);
    let layer = moe(&[2, 2], 8, 6);
    let e = layer
        .forward(randn([5, 8], 1.0), &Experts::Gates(randn([5, 3], 1.0)))
        .unwrap_err();
    assert!(
        e.to_string().contains("gates") && e.to_string().contains("[5, 2]"),
        "{e}"
    );
    let mut l = LoraLinear::<B>::new(randn([6, 8], 1.0), None).unwrap();
    let wrong = LoraAdapter::from_tensors(
        randn([2, 9], 1.0),
        randn([6, 2], 1.0),
        &AdapterSpec::new(2, 2.0),
        9,
        6,
    )
    .unwrap();
    let e = l.insert_adapter("w", wrong).unwrap_err();
    assert!(e.to_string().contains("w.lora_A.weight"), "{e}");
    let e = LoraLinear::<B>::new(randn([6, 8], 1.0), Some(randn([5], 1.0))).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}

/// DoRA: the layer equals the dense reference `f·(x·(W + ΔW)ᵀ) + b` with
/// `f = m / ‖W + ΔW‖` per row, merging keeps the output, unmerging restores `W`.
#[test]
fn dora_forward_merge_and_unmerge_match_the_dense_reference() {
    let (d_in, d_out, r) = (20, 10, 4);
    let w = randn([d_out, d_in], 0.2);
    let bias = randn([d_out], 0.1);
    let w0 = vals(w.clone());
    let spec = AdapterSpec::new(r, 8.0).with_dora(true);
    let a = randn([r, d_in], 0.3);
    let b = randn([d_out, r], 0.3);
    let m = randn([d_out], 0.2) + 1.0;
    let adapter = LoraAdapter::from_tensors(a.clone(), b.clone(), &spec, d_in, d_out)
        .unwrap()
        .with_magnitude(m.clone());
    let mut layer = LoraLinear::new(w.clone(), Some(bias.clone())).unwrap();
    layer.insert_adapter("d", adapter).unwrap();
    let x = randn([6, d_in], 1.0);
    let adapted = w.clone() + b.matmul(a) * spec.scaling();
    let norm = adapted.clone().powi_scalar(2).sum_dim(1).sqrt(); // [out, 1]
    let f = m.unsqueeze_dim::<2>(1) / norm;
    let want = x.clone().matmul((adapted * f).transpose()) + bias.unsqueeze_dim(0);
    let want = vals(want);
    assert_close("DoRA forward", &vals(layer.forward(x.clone())), &want, 1e-5);
    layer.merge().unwrap();
    assert_close("merged DoRA", &vals(layer.forward(x.clone())), &want, 1e-5);
    layer.unmerge();
    assert_close("unmerged W", &vals(layer.weight.val()), &w0, 1e-5);
    assert_close("after unmerge", &vals(layer.forward(x)), &want, 1e-5);
    // a magnitude of the wrong length is refused by name
    let bad = LoraAdapter::from_tensors(
        randn([r, d_in], 0.3),
        randn([d_out, r], 0.3),
        &spec,
        d_in,
        d_out,
    )
    .unwrap()
    .with_magnitude(randn([d_out + 1], 1.0));
    let e = layer.insert_adapter("e", bad).unwrap_err().to_string();
    assert!(e.contains("e.lora_magnitude_vector"), "{e}");
}
