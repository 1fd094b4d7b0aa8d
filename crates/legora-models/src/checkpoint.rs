//! Gradient checkpointing: a training step that keeps only each decoder layer's input
//! alive between the forward and the backward pass, and recomputes one layer at a time
//! in the backward (transformers' `gradient_checkpointing_enable()`, non-reentrant).
//!
//! 1. **Forward without a graph**: every layer runs on a copy whose parameters do not
//!    require gradients, so no op records its saved activations; the layer inputs
//!    `h_0 … h_{L−1}`, the last output `h_L` and every router's outputs are kept.
//! 2. **Head**: `norm`, `lm_head` and the caller's loss run with autodiff on `h_L` and the
//!    routers' outputs as leaves; its backward gives their gradients.
//! 3. **Layers, last to first**: layer `i` runs again on `h_i` with autodiff and the
//!    backward of `Σ y·∂L/∂y` over its output and its routers' outputs gives the
//!    gradients of its parameters and of `h_i` — exactly the vector-Jacobian product
//!    the one-graph backward computes.
//!
//! The backend's generator is seeded per layer from seeds drawn at the start of the step,
//! so a recomputed layer draws the same dropout masks and router jitter as its first run.

use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use legora_nn::RouterOutput;

use crate::decoder::{CausalLm, LmInput, Routing};
use crate::error::ModelError;
use crate::head::LossOutput;

/// The seven tensors of a router's output, in a fixed order.
fn router_tensors<B: AutodiffBackend>(o: &RouterOutput<B>) -> Vec<RouterTensor<B>> {
    vec![
        RouterTensor::Two(o.gates.clone()),
        RouterTensor::Two(o.logits.clone()),
        RouterTensor::Two(o.probs.clone()),
        RouterTensor::One(o.aux_loss.clone()),
        RouterTensor::One(o.z_loss.clone()),
        RouterTensor::One(o.load.clone()),
        RouterTensor::One(o.importance.clone()),
    ]
}

/// One tensor of a router's output.
enum RouterTensor<B: AutodiffBackend> {
    One(Tensor<B, 1>),
    Two(Tensor<B, 2>),
}

impl<B: AutodiffBackend> RouterTensor<B> {
    /// A leaf with the same values that collects a gradient.
    fn leaf(&self) -> Self {
        match self {
            Self::One(t) => Self::One(t.clone().detach().require_grad()),
            Self::Two(t) => Self::Two(t.clone().detach().require_grad()),
        }
    }

    /// `Σ self · g` with `g` the gradient `grads` holds for `leaf` (`None`: no gradient
    /// reached the leaf).
    fn dot_grad(&self, leaf: &Self, grads: &B::Gradients) -> Option<Tensor<B, 1>> {
        match (self, leaf) {
            (Self::One(t), Self::One(l)) => l
                .grad(grads)
                .map(|g| (t.clone() * Tensor::from_inner(g)).sum()),
            (Self::Two(t), Self::Two(l)) => l
                .grad(grads)
                .map(|g| (t.clone() * Tensor::from_inner(g)).sum()),
            _ => None,
        }
    }
}

/// A router output rebuilt from leaves (what the head's loss sees).
fn leaf_output<B: AutodiffBackend>(leaves: &[RouterTensor<B>]) -> RouterOutput<B> {
    let two = |i: usize| match &leaves[i] {
        RouterTensor::Two(t) => t.clone(),
        RouterTensor::One(_) => unreachable!("router_tensors fixes the order"),
    };
    let one = |i: usize| match &leaves[i] {
        RouterTensor::One(t) => t.clone(),
        RouterTensor::Two(_) => unreachable!("router_tensors fixes the order"),
    };
    RouterOutput {
        gates: two(0),
        logits: two(1),
        probs: two(2),
        aux_loss: one(3),
        z_loss: one(4),
        load: one(5),
        importance: one(6),
    }
}

/// `n` seeds for the backend's generator, drawn from it.
fn draw_seeds<B: AutodiffBackend>(n: usize, device: &B::Device) -> Vec<u64> {
    let u: Vec<f32> = Tensor::<B::InnerBackend, 1>::random([2 * n], Distribution::Default, device)
        .into_data()
        .to_vec()
        .unwrap_or_default();
    u.chunks(2)
        .map(|p| {
            p.iter()
                .fold(0u64, |acc, v| (acc << 24) ^ ((v * 16_777_216.0) as u64))
        })
        .collect()
}

/// What one layer's first run kept: its input and its routers' outputs (as leaves).
struct Kept<B: AutodiffBackend> {
    input: Tensor<B, 3>,
    routing: Vec<(Routing<B>, Vec<RouterTensor<B>>)>,
}

impl<B: AutodiffBackend> CausalLm<B> {
    /// One training step's forward and backward with gradient checkpointing (see the
    /// module docs): `loss` turns the output into the objective to differentiate (and
    /// whatever else the caller wants back), and `on_grads` receives the gradients, once
    /// for the head and once per decoder layer (last to first); each parameter's gradient
    /// is in exactly one of them. Equal to `loss(forward(input)).backward()` up to
    /// floating-point rounding; memory holds one layer's activations instead of all.
    ///
    /// # Shapes
    /// - as [`CausalLm::forward`]; `loss` returns a `[1]` objective
    pub fn backward_checkpointed<T, E>(
        &self,
        input: LmInput<B>,
        loss: impl FnOnce(LossOutput<B>) -> std::result::Result<(Tensor<B, 1>, T), E>,
        on_grads: &mut dyn FnMut(B::Gradients),
    ) -> std::result::Result<T, E>
    where
        E: From<ModelError>,
    {
        let device = input.input_ids.device();
        let layers = &self.model.layers;
        // one seed per layer, one for the head, one for the generator after the step
        let seeds = draw_seeds::<B>(layers.len() + 2, &device);
        let (ctx, h0) = self.prepare(input, 0)?;
        let mut kept = Vec::with_capacity(layers.len());
        // layer 0 keeps the embeddings as they are (with their graph, should they train)
        let mut h = h0;
        for (i, layer) in layers.iter().enumerate() {
            B::seed(&device, seeds[i]);
            let mut routing = Vec::new();
            let out = layer.clone().no_grad().forward_uncached(
                h.clone().detach(),
                &ctx,
                i,
                &mut routing,
            )?;
            let routing = routing
                .into_iter()
                .map(|r| {
                    let leaves: Vec<_> =
                        router_tensors(&r.output).iter().map(|t| t.leaf()).collect();
                    (r, leaves)
                })
                .collect();
            kept.push(Kept { input: h, routing });
            h = out.detach();
        }
        B::seed(&device, seeds[layers.len()]);
        // the head, on leaves
        let h_last = h.require_grad();
        let mut routing: Vec<Routing<B>> = kept
            .iter()
            .flat_map(|k| k.routing.iter())
            .map(|(r, leaves)| Routing {
                layer: r.layer,
                slot: r.slot,
                output: leaf_output(leaves),
            })
            .collect();
        let head = self.head_for_loss(h_last.clone(), &ctx, &mut routing)?;
        let (objective, value) = loss(LossOutput { head, routing })?;
        let grads = objective.backward();
        let mut upstream = h_last.grad(&grads);
        let router_grads = grads;
        for (i, layer) in layers.iter().enumerate().rev() {
            let k = kept.pop().expect("one kept input per layer");
            B::seed(&device, seeds[i]);
            let x = if i > 0 {
                k.input.require_grad()
            } else {
                k.input
            };
            let mut routing = Vec::new();
            let y = layer.forward_uncached(x.clone(), &ctx, i, &mut routing)?;
            let mut terms: Vec<Tensor<B, 1>> = Vec::new();
            if let Some(g) = upstream.take() {
                terms.push((y * Tensor::from_inner(g)).sum());
            }
            for (r, (_, leaves)) in routing.iter().zip(&k.routing) {
                for (t, l) in router_tensors(&r.output).iter().zip(leaves) {
                    terms.extend(t.dot_grad(l, &router_grads));
                }
            }
            let Some(surrogate) = terms.into_iter().reduce(|a, b| a + b) else {
                continue;
            };
            let grads = surrogate.backward();
            if i > 0 {
                upstream = x.grad(&grads);
            }
            on_grads(grads);
        }
        on_grads(router_grads);
        B::seed(&device, seeds[layers.len() + 1]);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::backend::Backend;
    use legora_nn::{InitLoraWeights, LoraConfig, RouterConfig};

    use super::*;
    use crate::Config;

    type Ad = Autodiff<Flex>;

    /// Each trainable parameter's gradient, read from any of `grads` (flattened).
    struct Collect<'a> {
        grads: &'a [<Ad as AutodiffBackend>::Gradients],
        out: Vec<(String, Vec<f32>)>,
    }

    impl ModuleVisitor<Ad> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Ad, D>>) {
            let found: Vec<_> = self
                .grads
                .iter()
                .filter_map(|g| param.val().grad(g))
                .collect();
            assert!(
                found.len() <= 1,
                "a parameter's gradient is in one part only"
            );
            if let Some(g) = found.into_iter().next() {
                let v = g.into_data().convert::<f32>().to_vec().unwrap();
                self.out.push((param.id.to_string(), v));
            }
        }
    }

    fn model(dropout: f64, jitter: f64) -> CausalLm<Ad> {
        let cfg = Config::from_json(
            r#"{"model_type": "qwen2", "vocab_size": 37, "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2}"#,
        )
        .unwrap();
        let device = Default::default();
        Ad::seed(&device, 3);
        let mut m = CausalLm::<Ad>::random(cfg.resolve().unwrap(), 0.2, &device).unwrap();
        let all = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        for (name, r) in [("a", 2), ("b", 3)] {
            let mut c = LoraConfig::new(r, 4.0, &all);
            c.lora_dropout = dropout;
            c.init_lora_weights = InitLoraWeights::Random;
            m.add_adapter(name, &c).unwrap();
        }
        let rc = RouterConfig::new(2)
            .with_top_k(1)
            .with_aux_loss(0.01)
            .with_z_loss(0.001)
            .with_jitter(jitter);
        m.adapters_to_mixture(&["a", "b"], Some(&rc)).unwrap();
        m
    }

    fn input() -> LmInput<Ad> {
        let rows = vec![vec![1, 5, 9, 2, 30, 7, 7], vec![4, 4, 11, 36, 0, 3, 8]];
        let device = Default::default();
        let mask = Tensor::from_data(
            burn::tensor::TensorData::new(
                vec![1i64, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1],
                [2, 7],
            ),
            &device,
        );
        LmInput::from_tokens(&rows, &device)
            .unwrap()
            .with_attention_mask(mask)
    }

    /// Mean logit² + Σ router losses + Σ probs²: every router output and the logits
    /// carry gradient.
    fn loss(out: LossOutput<Ad>) -> Tensor<Ad, 1> {
        let mut l = out.head.clone().logits().powi_scalar(2).mean().reshape([1]);
        if let Some(aux) = out.aux_loss() {
            l = l + aux;
        }
        for r in &out.routing {
            l = l + r.output.probs.clone().powi_scalar(2).sum() * 0.1;
        }
        l
    }

    /// The one-graph step, with the generator seeded per layer as the checkpointed one.
    fn reference(m: &CausalLm<Ad>, seed: u64) -> (f32, Vec<(String, Vec<f32>)>) {
        let device = Default::default();
        Ad::seed(&device, seed);
        let seeds = draw_seeds::<Ad>(m.model.layers.len() + 2, &device);
        let (ctx, mut h) = m.prepare(input(), 0).unwrap();
        let mut routing = Vec::new();
        for (i, layer) in m.model.layers.iter().enumerate() {
            Ad::seed(&device, seeds[i]);
            h = layer.forward_uncached(h, &ctx, i, &mut routing).unwrap();
        }
        Ad::seed(&device, seeds[m.model.layers.len()]);
        let head = m.head_for_loss(h, &ctx, &mut routing).unwrap();
        let l = loss(LossOutput { head, routing });
        let v = l.clone().into_scalar();
        let grads = [l.backward()];
        let mut c = Collect {
            grads: &grads,
            out: Vec::new(),
        };
        m.visit(&mut c);
        (v, c.out)
    }

    fn checkpointed(m: &CausalLm<Ad>, seed: u64) -> (f32, Vec<(String, Vec<f32>)>) {
        Ad::seed(&Default::default(), seed);
        let mut grads = Vec::new();
        let v = m
            .backward_checkpointed(
                input(),
                |out| {
                    let l = loss(out);
                    Ok::<_, ModelError>((l.clone(), l.into_scalar()))
                },
                &mut |g| grads.push(g),
            )
            .unwrap();
        let mut c = Collect {
            grads: &grads,
            out: Vec::new(),
        };
        m.visit(&mut c);
        (v, c.out)
    }

    fn assert_close(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) {
        assert_eq!(a.len(), b.len(), "same parameters with gradients");
        // LoRA A and B of 2 experts on 7 projections, one router, per layer
        assert_eq!(a.len(), 3 * (2 * 2 * 7 + 1));
        for ((na, ga), (nb, gb)) in a.iter().zip(b) {
            assert_eq!(na, nb);
            let scale = ga.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            assert!(scale > 1e-9, "{na}: a zero gradient tests nothing");
            legora_testing::assert_close(na, gb, ga, 1e-5, 1e-12);
        }
    }

    #[test]
    fn checkpointed_gradients_equal_the_one_graph_backward() {
        // the backend's generator is one per process: seeded tests run one at a time
        let _rng = legora_testing::serial();
        let m = model(0.0, 0.0);
        let (va, ga) = reference(&m, 11);
        let (vb, gb) = checkpointed(&m, 11);
        assert!((va - vb).abs() <= 1e-6 * va.abs(), "{va} vs {vb}");
        assert_close(&ga, &gb);
        // without per-layer seeding the plain forward gives the same (no randomness)
        let out = m.forward(input()).unwrap();
        let out = LossOutput {
            head: crate::HeadOutput::Logits(out.logits),
            routing: out.routing,
        };
        assert!((loss(out).into_scalar() - va).abs() <= 1e-6 * va.abs());
    }

    #[test]
    fn a_recomputed_layer_draws_the_same_dropout_masks_and_jitter() {
        let _rng = legora_testing::serial();
        let m = model(0.3, 0.05);
        let (va, ga) = reference(&m, 5);
        let (vb, gb) = checkpointed(&m, 5);
        assert!((va - vb).abs() <= 1e-6 * va.abs(), "{va} vs {vb}");
        assert_close(&ga, &gb);
        // and the masks are really random: another seed gives another loss
        let (vc, _) = checkpointed(&m, 6);
        assert!(
            (va - vc).abs() > 1e-6,
            "dropout changed nothing: {va} vs {vc}"
        );
    }
}
