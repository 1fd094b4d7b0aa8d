//! legora-data end to end: loss masks, truncation, padding, packing, sampler mixing,
//! splits and exact resumption of the data stream.

use legora_data::*;

fn opts(max: usize) -> TokenizeOptions {
    TokenizeOptions::new(max)
}

fn example(rec: &Record, task: usize, max: usize) -> Example {
    let r = Template::Alpaca.render(rec, 0).unwrap();
    tokenize_rendered(&r, task, &ByteTokenizer, &opts(max))
        .unwrap()
        .unwrap()
        .0
}

#[test]
fn prompt_tokens_carry_no_loss() {
    let rec = Record::completion("shop", "Track parcel 123456", "At the Beijing hub");
    let rendered = Template::Alpaca.render(&rec, 0).unwrap();
    let prompt = rendered.prompt();
    let ex = example(&rec, 0, 4096);
    // BOS + prompt bytes are masked; completion bytes + EOS are labelled with themselves
    let n_prompt = 1 + prompt.len();
    assert_eq!(ex.input_ids[0], ByteTokenizer::BOS);
    assert!(ex.labels[..n_prompt].iter().all(|l| *l == IGNORE_INDEX));
    let target: Vec<i64> = "At the Beijing hub"
        .bytes()
        .map(i64::from)
        .chain([i64::from(ByteTokenizer::EOS)])
        .collect();
    assert_eq!(&ex.labels[n_prompt..], &target[..]);
    assert_eq!(ex.len(), n_prompt + target.len());
    assert_eq!(ex.num_targets(), target.len());
    // ids under the loss equal the labels
    for (id, l) in ex.input_ids.iter().zip(&ex.labels) {
        if *l != IGNORE_INDEX {
            assert_eq!(i64::from(*id), *l);
        }
    }
}

#[test]
fn chatml_masks_user_and_system_turns() {
    let rec = Record::chat(
        "npc",
        vec![
            Message::new(Role::System, "Be Grom."),
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hm."),
        ],
    );
    let r = Template::ChatMl.render(&rec, 0).unwrap();
    let ex = tokenize_rendered(&r, 2, &ByteTokenizer, &opts(4096))
        .unwrap()
        .unwrap()
        .0;
    let trained: Vec<u8> = ex
        .labels
        .iter()
        .filter(|l| **l != IGNORE_INDEX && **l < 256)
        .map(|l| *l as u8)
        .collect();
    assert_eq!(String::from_utf8(trained).unwrap(), "Hm.<|im_end|>");
    assert_eq!(ex.task, 2);
}

#[test]
fn truncation_and_eos() {
    let rec = Record::completion("t", "p", "abcdef");
    let full = example(&rec, 0, 4096);
    let n = full.len();
    // cut two tokens: EOS and 'f' disappear, still trainable
    let r = Template::Alpaca.render(&rec, 0).unwrap();
    let (cut, truncated) = tokenize_rendered(&r, 0, &ByteTokenizer, &opts(n - 2))
        .unwrap()
        .unwrap();
    assert!(truncated);
    assert_eq!(cut.len(), n - 2);
    assert_eq!(cut.input_ids[..], full.input_ids[..n - 2]);
    assert_eq!(cut.num_targets(), "abcde".len());
    // the prompt alone fills max_seq_len: dropped
    let prompt_len = 1 + r.prompt().len();
    assert!(tokenize_rendered(&r, 0, &ByteTokenizer, &opts(prompt_len))
        .unwrap()
        .is_none());
    let (_, stats) = tokenize_all(&[r.clone(), r], 0, &ByteTokenizer, &opts(prompt_len)).unwrap();
    assert_eq!(stats.dropped, 2);
    // no EOS appended when asked not to
    let r = Template::Raw.render(&rec, 0).unwrap();
    let o = TokenizeOptions {
        max_seq_len: 64,
        add_special_tokens: false,
        append_eos: false,
    };
    let ex = tokenize_rendered(&r, 0, &ByteTokenizer, &o)
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(ByteTokenizer.decode(&ex.input_ids).unwrap(), "pabcdef");
    assert_eq!(ex.labels[0], IGNORE_INDEX);
    assert_eq!(ex.num_targets(), 6);
}

#[test]
fn batches_are_right_padded_with_mask_and_tasks() {
    let a = example(&Record::completion("a", "x", "yy"), 0, 4096);
    let b = example(&Record::completion("b", "xyz", "y"), 1, 4096);
    let batcher = Batcher::for_tokenizer(&ByteTokenizer);
    assert_eq!(batcher, Batcher::new(ByteTokenizer::PAD));
    let batch = batcher.collate(&[&a, &b]).unwrap();
    let s = a.len().max(b.len());
    assert_eq!((batch.batch_size, batch.seq_len), (2, s));
    assert_eq!(batch.task_ids, [0, 1]);
    for (row, ex) in [&a, &b].into_iter().enumerate() {
        let ids = batch.row_ids(row);
        assert_eq!(&ids[..ex.len()], &ex.input_ids[..]);
        assert!(ids[ex.len()..].iter().all(|i| *i == ByteTokenizer::PAD));
        assert!(batch.row_labels(row)[ex.len()..]
            .iter()
            .all(|l| *l == IGNORE_INDEX));
        let mask = &batch.attention_mask[row * s..(row + 1) * s];
        assert_eq!(mask.iter().sum::<u32>() as usize, ex.len());
        assert!(mask[..ex.len()].iter().all(|m| *m == 1));
        let pos = &batch.position_ids[row * s..row * s + ex.len()];
        assert_eq!(pos, (0..ex.len() as u32).collect::<Vec<_>>());
    }
    assert_eq!(batch.num_tokens(), a.len() + b.len());
    // first label of a row is never predicted (HF shift): targets = Σ num_targets here
    assert_eq!(batch.num_target_tokens(), a.num_targets() + b.num_targets());
    let mut m8 = batcher;
    m8.pad_to_multiple_of = Some(64);
    assert_eq!(m8.collate(&[&a]).unwrap().seq_len % 64, 0);
    let mut fixed = batcher;
    fixed.pad_to = Some(3);
    let e = fixed.collate(&[&a]).unwrap_err();
    assert!(e.to_string().contains("pad_to"), "{e}");
}

#[test]
fn split_by_task_keeps_each_row_and_trims_its_padding() {
    let long = example(
        &Record::completion("a long prompt here", "x", "yyyyyy"),
        0,
        4096,
    );
    let short0 = example(&Record::completion("a", "x", "y"), 1, 4096);
    let short1 = example(&Record::completion("b", "xy", "y"), 1, 4096);
    let batch = Batcher::new(ByteTokenizer::PAD)
        .collate(&[&short0, &long, &short1])
        .unwrap();
    let parts = batch.split_by_task();
    assert_eq!(parts.len(), 2);
    // order of first appearance: task 1 (rows 0, 2), then task 0 (row 1)
    assert_eq!(parts[0].task_ids, [1, 1]);
    assert_eq!(parts[1].task_ids, [0]);
    assert_eq!(parts[0].seq_len, short0.len().max(short1.len()));
    assert_eq!(parts[1].seq_len, long.len());
    for (part, rows) in [(&parts[0], [0usize, 2].as_slice()), (&parts[1], &[1])] {
        for (i, &r) in rows.iter().enumerate() {
            let n = part.seq_len;
            assert_eq!(part.row_ids(i), &batch.row_ids(r)[..n]);
            assert_eq!(part.row_labels(i), &batch.row_labels(r)[..n]);
            // nothing real was dropped
            assert!(
                batch.attention_mask[r * batch.seq_len + n..(r + 1) * batch.seq_len]
                    .iter()
                    .all(|m| *m == 0)
            );
        }
    }
    let total: usize = parts.iter().map(|p| p.num_target_tokens()).sum();
    assert_eq!(total, batch.num_target_tokens());
    assert!(
        parts
            .iter()
            .map(|p| p.batch_size * p.seq_len)
            .sum::<usize>()
            < 3 * batch.seq_len
    );
}

#[test]
fn shards_split_the_rows_evenly_and_keep_the_whole_batchs_totals() {
    let rows: Vec<Example> = (0..5)
        .map(|i| {
            let prompt = "p".repeat(i + 1);
            example(
                &Record::completion(&prompt, "x", "y".repeat(5 - i)),
                i % 2,
                4096,
            )
        })
        .collect();
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = Batcher::new(ByteTokenizer::PAD).collate(&refs).unwrap();
    let totals = batch.totals();
    assert_eq!(totals.target_tokens, batch.num_target_tokens());
    assert_eq!(totals.real_tokens, batch.num_tokens());
    assert_eq!(totals.tasks_present(), 2);
    // 5 rows over 2 ranks: 3 + 2, in order; over 7 ranks: one each, then empty shards
    let shards: Vec<Batch> = (0..2).map(|r| batch.shard(r, 2)).collect();
    assert_eq!(shards[0].batch_size, 3);
    assert_eq!(shards[1].batch_size, 2);
    assert_eq!(shards[1].task_ids, batch.task_ids[3..]);
    let targets: usize = shards.iter().map(|s| s.num_target_tokens()).sum();
    assert_eq!(targets, totals.target_tokens);
    for task in 0..2 {
        let per_task: usize = shards.iter().map(|s| s.totals().task_targets(task)).sum();
        assert_eq!(per_task, totals.task_targets(task));
    }
    let sizes: Vec<usize> = (0..7).map(|r| batch.shard(r, 7).batch_size).collect();
    assert_eq!(sizes, [1, 1, 1, 1, 1, 0, 0]);
    assert_eq!(batch.shard(0, 1), batch.select_rows(&[0, 1, 2, 3, 4]));
}

#[test]
fn packing_keeps_sequences_apart() {
    let exs: Vec<Example> = (0..10)
        .map(|i| example(&Record::completion("t", "q", "a".repeat(i + 1)), 0, 4096))
        .collect();
    let total: usize = exs.iter().map(Example::len).sum();
    let max = 3 * exs[9].len();
    let rows = pack(&exs, max, 5).unwrap();
    assert!(rows.len() < exs.len());
    assert_eq!(rows.iter().map(Example::len).sum::<usize>(), total);
    assert_eq!(rows.iter().map(|r| r.seq_lens.len()).sum::<usize>(), 10);
    // the first label of every packed sequence is masked
    let targets: usize = rows.iter().map(Example::num_targets).sum();
    assert_eq!(targets, exs.iter().map(Example::num_targets).sum::<usize>());
    assert!(rows.iter().all(|r| r.len() <= max));
    let batch = Batcher::new(0)
        .collate(&rows.iter().collect::<Vec<_>>())
        .unwrap();
    assert!(batch.is_packed());
    let row0 = &rows[0];
    let s = batch.seq_len;
    let starts: Vec<usize> = row0
        .seq_lens
        .iter()
        .scan(0, |acc, l| {
            let s = *acc;
            *acc += l;
            Some(s)
        })
        .collect();
    for (k, st) in starts.iter().enumerate() {
        assert_eq!(batch.position_ids[*st], 0, "positions restart");
        assert_eq!(batch.sequence_ids[*st], k as u32);
    }
    assert_eq!(
        batch.attention_mask[..s].iter().sum::<u32>() as usize,
        row0.len()
    );
    // packing is deterministic in the seed
    assert_eq!(rows, pack(&exs, max, 5).unwrap());
}

fn freqs(sampler: &mut MultiTaskSampler, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0usize; k];
    for _ in 0..n {
        c[sampler.draw().0] += 1;
    }
    c.into_iter().map(|x| x as f64 / n as f64).collect()
}

#[test]
fn sampler_proportions() {
    let tasks: Vec<(String, usize)> = vec![("a".into(), 100), ("b".into(), 400), ("c".into(), 25)];
    let sizes = [100, 400, 25];
    // hand values: proportional n/525; T=2: sqrt(n) = 10, 20, 5 over 35; uniform 1/3
    let cases = [
        (
            Mixing::Proportional,
            [100.0 / 525.0, 400.0 / 525.0, 25.0 / 525.0],
        ),
        (
            Mixing::Temperature { temperature: 2.0 },
            [10.0 / 35.0, 20.0 / 35.0, 5.0 / 35.0],
        ),
        (Mixing::Uniform, [1.0 / 3.0; 3]),
    ];
    for (mixing, want) in cases {
        let p = mixing.probabilities(&sizes).unwrap();
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{mixing:?}: {p:?}");
        }
        let mut s = MultiTaskSampler::new(&tasks, mixing, 11).unwrap();
        let f = freqs(&mut s, 60_000, 3);
        // binomial std ≤ sqrt(0.25/60000) ≈ 0.002: allow 5 std
        for (a, b) in f.iter().zip(want) {
            assert!(
                (a - b).abs() < 0.01,
                "{mixing:?}: drew {f:?}, want {want:?}"
            );
        }
    }
    // T = 1 is proportional
    let t1 = Mixing::Temperature { temperature: 1.0 }
        .probabilities(&sizes)
        .unwrap();
    let pr = Mixing::Proportional.probabilities(&sizes).unwrap();
    assert!(t1.iter().zip(&pr).all(|(a, b)| (a - b).abs() < 1e-12));
    assert!(Mixing::from_name("temperature", Some(0.0)).is_err());
    let e = Mixing::from_name("zipf", None).unwrap_err();
    assert!(e.to_string().contains("\"zipf\""), "{e}");
}

#[test]
fn each_task_visits_every_example_once_per_epoch_in_its_own_order() {
    let tasks: Vec<(String, usize)> = vec![("a".into(), 7), ("b".into(), 3)];
    let mut s = MultiTaskSampler::new(&tasks, Mixing::Uniform, 1).unwrap();
    let mut seen_a = Vec::new();
    while seen_a.len() < 14 {
        let (t, i) = s.draw();
        if t == 0 {
            seen_a.push(i);
        }
    }
    let mut e0 = seen_a[..7].to_vec();
    e0.sort_unstable();
    assert_eq!(e0, (0..7).collect::<Vec<_>>());
    assert_ne!(seen_a[..7], seen_a[7..], "a new permutation each epoch");
    // the order of task "a" does not depend on the other tasks
    let alone: Vec<(String, usize)> = vec![("a".into(), 7)];
    let mut s2 = MultiTaskSampler::new(&alone, Mixing::Proportional, 1).unwrap();
    let a2: Vec<usize> = (0..14).map(|_| s2.draw().1).collect();
    assert_eq!(a2, seen_a);
}

#[test]
fn balanced_batches_hold_equal_rows_per_task() {
    let tasks: Vec<(String, usize)> = vec![("a".into(), 5), ("b".into(), 9), ("c".into(), 2)];
    let mut s = MultiTaskSampler::new(&tasks, Mixing::Balanced, 3).unwrap();
    let b = s.next_batch(6).unwrap();
    let t: Vec<usize> = b.iter().map(|x| x.0).collect();
    assert_eq!(t, [0, 0, 1, 1, 2, 2]);
    let e = s.next_batch(4).unwrap_err();
    assert!(
        e.to_string()
            .contains("multiple of the number of tasks (3)"),
        "{e}"
    );
}

fn loader(seed: u64) -> Loader {
    let mk = |task: usize, n: usize| -> Vec<Example> {
        (0..n)
            .map(|i| {
                example(
                    &Record::completion("t", format!("q{task}"), "a".repeat(i % 5 + 1)),
                    task,
                    4096,
                )
            })
            .collect()
    };
    Loader::new(
        vec![("a".into(), mk(0, 13)), ("b".into(), mk(1, 6))],
        Mixing::Temperature { temperature: 2.0 },
        seed,
        Batcher::new(ByteTokenizer::PAD),
        4,
        None,
    )
    .unwrap()
}

#[test]
fn loader_resumes_exactly_from_its_state() {
    let mut full = loader(9);
    let all: Vec<Batch> = (0..12).map(|_| full.next_batch().unwrap()).collect();
    let mut first = loader(9);
    for b in all.iter().take(5) {
        assert_eq!(&first.next_batch().unwrap(), b);
    }
    // serialize the state as a checkpoint would, restore into a fresh loader
    let json = serde_json::to_string(&first.state()).unwrap();
    let mut resumed = loader(9);
    resumed
        .restore(serde_json::from_str(&json).unwrap())
        .unwrap();
    for b in &all[5..] {
        assert_eq!(&resumed.next_batch().unwrap(), b);
    }
    let mut other = loader(10);
    assert_ne!(
        other.next_batch().unwrap(),
        all[0],
        "the seed changes the stream"
    );
    assert_eq!(full.batches_per_epoch(), 5);
    // a state from other data is refused
    let mut st = first.state();
    st.sampler.cursors.pop();
    let e = resumed.restore(st).unwrap_err();
    assert!(e.to_string().contains("expected 2, found 1"), "{e}");
}

#[test]
fn splits_are_deterministic_and_disjoint() {
    let s = split_indices(50, ValSplit::Fraction(0.2), 42, "medical").unwrap();
    assert_eq!(s.val.len(), 10);
    assert_eq!(s.train.len(), 40);
    let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..50).collect::<Vec<_>>());
    assert_eq!(
        s,
        split_indices(50, ValSplit::Fraction(0.2), 42, "medical").unwrap()
    );
    assert_ne!(
        s,
        split_indices(50, ValSplit::Fraction(0.2), 43, "medical").unwrap()
    );
    assert_ne!(
        s.val,
        split_indices(50, ValSplit::Fraction(0.2), 42, "finance")
            .unwrap()
            .val
    );
    assert_eq!(
        split_indices(50, ValSplit::Count(3), 1, "x")
            .unwrap()
            .val
            .len(),
        3
    );
    let e = split_indices(5, ValSplit::Count(5), 1, "x").unwrap_err();
    assert!(e.to_string().contains("task `x`"), "{e}");
    assert!(split_indices(5, ValSplit::Fraction(1.0), 1, "x").is_err());
}

#[test]
fn prepare_task_renders_and_counts() {
    let recs = vec![
        Record::completion("m", "a", "b"),
        Record::completion("m", "a".repeat(400), "b"),
    ];
    let (exs, stats) =
        prepare_task(&recs, 1, &Template::Alpaca, &ByteTokenizer, &opts(200)).unwrap();
    assert_eq!(exs.len(), 1);
    assert_eq!(
        stats,
        TokenizeStats {
            kept: 1,
            truncated: 0,
            dropped: 1
        }
    );
    let bad = vec![Record::chat("m", vec![Message::new(Role::Assistant, "x")])];
    let e = prepare_task(&bad, 0, &Template::Alpaca, &ByteTokenizer, &opts(200)).unwrap_err();
    assert!(e.to_string().starts_with("task `m`, record 0"), "{e}");
}
