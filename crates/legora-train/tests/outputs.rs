//! Plots and reports: files that decode, show text, and tables that hold the numbers.

use super::common;

use std::collections::BTreeMap;
use std::path::Path;

use common::tmp_dir;
use legora_train::*;

/// Decode a PNG: (width, height, RGB(A) bytes, channels).
fn decode(path: &Path) -> (u32, u32, Vec<u8>, usize) {
    let f = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(f).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf, info.color_type.samples())
}

/// Pixels in the rectangle that are neither white nor the background.
fn dark_pixels(img: &(u32, u32, Vec<u8>, usize), x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
    let (w, _, data, c) = img;
    let mut n = 0;
    for y in y0..y1 {
        for x in x0..x1 {
            let i = (y * w + x) as usize * c;
            if data[i] < 100 && data[i + 1] < 100 && data[i + 2] < 100 {
                n += 1;
            }
        }
    }
    n
}

fn train_line(stage: &str, step: usize, loss: f64) -> MetricLine {
    MetricLine::Train(TrainMetrics {
        stage: stage.into(),
        step,
        total_steps: 20,
        epoch: step as f64 / 10.0,
        loss,
        terms: BTreeMap::from([("aux_loss".to_string(), 0.01 * loss)]),
        lr: 1e-3,
        grad_norm: 0.5,
        target_tokens: 100,
        tokens_per_second: 1000.0,
        elapsed_s: step as f64,
    })
}

#[test]
fn loss_plots_per_stage_render_with_text() {
    let _serial = crate::common::serial();
    let dir = tmp_dir("plots");
    let mut lines: Vec<MetricLine> = (1..=20)
        .map(|s| train_line("experts", s, 3.0 / s as f64))
        .collect();
    lines.extend((1..=5).map(|s| train_line("router", s, 1.0 - 0.1 * s as f64)));
    lines.push(MetricLine::Eval(EvalMetrics {
        stage: "experts".into(),
        step: 10,
        val_loss: 0.4,
        task_losses: BTreeMap::new(),
        routing: None,
        is_best: true,
    }));
    let files = plot_stage_losses(&lines, &dir).unwrap();
    assert_eq!(
        files,
        vec![dir.join("loss_experts.png"), dir.join("loss_router.png")]
    );
    let img = decode(&files[0]);
    assert_eq!((img.0, img.1), (960, 560));
    // the title (scale-2 bitmap font) is drawn in the top band, the curve inside the frame
    assert!(dark_pixels(&img, 80, 10, 600, 34) > 100, "no title text");
    let (w, h, data, c) = &img;
    let blue = (0..(w * h) as usize)
        .filter(|i| data[i * c] == 31 && data[i * c + 1] == 119 && data[i * c + 2] == 180)
        .count();
    assert!(blue > 200, "the train-loss line is missing ({blue} px)");
}

#[test]
fn routing_heatmap_has_a_cell_per_layer_and_expert() {
    let _serial = crate::common::serial();
    let dir = tmp_dir("heatmap");
    let stats = RoutingStats {
        layers: (0..3)
            .map(|l| format!("model.layers.{l}.self_attn.q_proj"))
            .collect(),
        load: vec![
            vec![0.7, 0.2, 0.1],
            vec![0.1, 0.8, 0.1],
            vec![0.3, 0.3, 0.4],
        ],
        accuracy: Some(0.93),
        entropy: Some(0.41),
    };
    let path = dir.join("routing_load.png");
    plot_routing_load(
        &path,
        &stats,
        &["medical".into(), "finance".into(), "game-npc".into()],
    )
    .unwrap();
    let img = decode(&path);
    // label column: 31 chars ("model.layers.0.self_attn.q_proj") · 8 px + 16; 3 cells of
    // 96 px; 24 px right margin
    assert_eq!(img.0, 31 * 8 + 16 + 3 * 96 + 24);
    assert_eq!(img.1, 64 + 3 * 22 + 40);
    // the hottest cell (0.8, layer 1 / expert 1) is the darkest blue
    let (w, _, data, c) = &img;
    let px = |x: u32, y: u32| {
        let i = (y * w + x) as usize * c;
        (data[i], data[i + 1], data[i + 2])
    };
    let x0 = 31 * 8 + 16;
    assert_eq!(px(x0 + 96 + 2, 64 + 22 + 2), (8, 48, 107));
    assert!(px(x0 + 2, 64 + 22 + 2).0 > 200, "0.1 is pale");
    let e = plot_routing_load(&path, &RoutingStats::default(), &[]).unwrap_err();
    assert!(e.to_string().contains("no routing load"), "{e}");
}

fn report() -> Report {
    let mut tasks = Vec::new();
    for (name, base, single, mix) in [("medical", 0.25, 0.5, 0.75), ("finance", 0.5, 0.625, 0.875)]
    {
        let m = |acc: f64, loss: f64| ModelMetrics {
            val_loss: Some(loss),
            metrics: BTreeMap::from([("accuracy".to_string(), acc)]),
        };
        tasks.push(TaskReport {
            task: name.into(),
            evaluator: format!("{name}/accuracy"),
            n_eval: 40,
            models: BTreeMap::from([
                ("base".to_string(), m(base, 2.5)),
                ("single_lora".to_string(), m(single, 1.5)),
                ("mixture".to_string(), m(mix, 1.25)),
            ]),
            routing_accuracy: Some(0.95),
            routing_entropy: Some(0.2),
            expert_load: Some(vec![0.9, 0.1]),
            primary_metric: Some(("accuracy".into(), true)),
        });
    }
    Report {
        run: "demo".into(),
        base_model: "models/tiny".into(),
        base_storage: String::new(),
        backend: String::new(),
        experts: vec!["medical".into(), "finance".into()],
        variants: vec!["base".into(), "single_lora".into(), "mixture".into()],
        tasks,
        routing: Some(RoutingStats {
            layers: vec!["model.layers.0.self_attn.q_proj".into()],
            load: vec![vec![0.5, 0.5]],
            accuracy: Some(0.95),
            entropy: Some(0.2),
        }),
        params: BTreeMap::from([(
            "mixture".to_string(),
            legora_train::ParamCount {
                trainable: 1000,
                total: 100000,
            },
        )]),
        stages: vec![StageSummary {
            stage: "experts".into(),
            steps: 20,
            total_steps: 20,
            stop: StopReason::Completed,
            best_val_loss: Some(1.25),
            best_step: Some(20),
            last_eval: None,
            last_checkpoint: None,
            steps_this_run: 20,
            elapsed_s: 12.3,
        }],
        plots: vec!["loss_experts.png".into()],
        notes: vec!["toy numbers".into()],
    }
}

#[test]
fn report_markdown_and_json() {
    let _serial = crate::common::serial();
    let dir = tmp_dir("report");
    let r = report();
    r.write(&dir).unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        md.contains("| task | metric | base | single LoRA | mixture |"),
        "{md}"
    );
    assert!(
        md.contains("| medical (n=40, medical/accuracy) | accuracy | 0.2500 | 0.5000 | 0.7500 |"),
        "{md}"
    );
    assert!(
        md.contains("| finance (n=40, finance/accuracy) | val loss | 2.5000 | 1.5000 | 1.2500 |"),
        "{md}"
    );
    assert!(
        md.contains("| medical | 0.9500 | 0.2000 | 0.9000 | 0.1000 |"),
        "{md}"
    );
    assert!(
        md.contains("| `model.layers.0.self_attn.q_proj` | 0.5000 | 0.5000 |"),
        "{md}"
    );
    assert!(md.contains("| mixture | 1000 | 100000 | 1.0000 |"), "{md}");
    assert!(
        md.contains("| experts | 20/20 | completed | 1.2500 (20) | 12.3 |"),
        "{md}"
    );
    assert!(md.contains("![loss_experts.png](loss_experts.png)"), "{md}");
    let back = Report::read_json(&dir.join("report.json")).unwrap();
    assert_eq!(back, r);
}
