//! The models a server holds: the base, PEFT adapters and mixtures, stacked as the
//! experts of one mixture per slot so that rows of one step may each use a different
//! one (see [`legora_models::CausalLm::forward_packed`]).
//!
//! Each adapter or mixture is an [`Entry`]: its experts' LoRA pairs per slot and, for a
//! mixture with layer routers, its [`RouterGroup`]. [`Registry::rebuild`] lays the
//! entries out one after the other: entry `i`'s expert `j` is expert `offset(i) + j` of
//! every mixture slot (absent where it adapts nothing), and each routed mixture's group
//! names its experts at those offsets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use legora_models::{CausalLm, RouterGroup, SeqExperts, Slot, SlotId};
use legora_nn::LoraAdapter;

use crate::error::{Result, ServeError};

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A PEFT adapter folder (one expert).
    Adapter,
    /// A legora mixture folder (several experts, maybe routers).
    Mixture,
}

/// One adapter or mixture held by the server.
#[derive(Debug, Clone)]
pub struct Entry<B: Backend> {
    /// Its model name in the API.
    pub name: String,
    /// Adapter or mixture.
    pub kind: EntryKind,
    /// The folder it was loaded from.
    pub path: PathBuf,
    /// Expert names, in gate order (an adapter: its own name).
    pub experts: Vec<String>,
    /// Per slot, the LoRA pair of each expert there (`None`: absent).
    slots: Vec<(SlotId, Vec<Option<LoraAdapter<B>>>)>,
    /// The layer routers of a routed mixture, over its own experts `0..n`.
    group: Option<RouterGroup<B>>,
    /// Loaded at run time (`POST /v1/adapters`): may be unloaded or evicted.
    pub runtime: bool,
    /// Bytes of its LoRA weights (f32).
    pub bytes: usize,
    /// Last use (a step counter), for LRU eviction.
    pub last_used: u64,
}

impl<B: Backend> Entry<B> {
    /// A PEFT adapter folder loaded against `base`.
    pub fn adapter(base: &CausalLm<B>, name: &str, dir: &Path) -> Result<Self> {
        let mut m = base.clone();
        legora_hub::load_adapter(&mut m, dir, name)?;
        let slots: Vec<(SlotId, Vec<Option<LoraAdapter<B>>>)> = m
            .adapter_modules(name)
            .into_iter()
            .map(|(id, a)| (id, vec![Some(a.clone())]))
            .collect();
        Ok(Self::new(
            name,
            EntryKind::Adapter,
            dir,
            vec![name.to_string()],
            slots,
            None,
        ))
    }

    /// A legora mixture folder loaded against `base`.
    pub fn mixture(base: &CausalLm<B>, name: &str, dir: &Path) -> Result<Self> {
        let mut m = base.clone();
        let cfg = legora_hub::load_mixture(&mut m, dir)?;
        let n = cfg.experts.len();
        let mut slots = Vec::new();
        for (id, slot) in m.slots() {
            if let Slot::Moe(moe) = slot {
                let experts = (0..n).map(|e| moe.expert(e).cloned()).collect();
                slots.push((id, experts));
            }
        }
        let group = m.router_group();
        Ok(Self::new(
            name,
            EntryKind::Mixture,
            dir,
            cfg.experts,
            slots,
            group,
        ))
    }

    fn new(
        name: &str,
        kind: EntryKind,
        dir: &Path,
        experts: Vec<String>,
        slots: Vec<(SlotId, Vec<Option<LoraAdapter<B>>>)>,
        group: Option<RouterGroup<B>>,
    ) -> Self {
        let bytes = slots
            .iter()
            .flat_map(|(_, e)| e.iter().flatten())
            .map(|a| {
                4 * (a.lora_A.val().shape().num_elements() + a.lora_B.val().shape().num_elements())
            })
            .sum();
        Self {
            name: name.to_string(),
            kind,
            path: dir.to_path_buf(),
            experts,
            slots,
            group,
            runtime: false,
            bytes,
            last_used: 0,
        }
    }

    /// Whether its rows can be routed by its own routers.
    pub fn has_routers(&self) -> bool {
        self.group.is_some()
    }
}

/// The base, the entries, and the stacked model built from them.
#[derive(Debug)]
pub struct Registry<B: Backend> {
    /// The base model's API name.
    pub base_name: String,
    base: CausalLm<B>,
    /// Entries in expert order.
    pub entries: Vec<Entry<B>>,
    /// The base with every entry's experts stacked in its mixture slots.
    pub model: CausalLm<B>,
    /// The routed mixtures' groups, at their experts' offsets.
    pub groups: Vec<RouterGroup<B>>,
    /// Per entry name: first expert and router group (if any).
    index: BTreeMap<String, (usize, Option<usize>)>,
    /// Bumped by every rebuild (sequences re-resolve their model).
    pub generation: u64,
}

impl<B: Backend> Registry<B> {
    /// A registry over `base` with no entries.
    pub fn new(base_name: &str, base: CausalLm<B>) -> Self {
        Self {
            base_name: base_name.to_string(),
            model: base.clone(),
            base,
            entries: Vec::new(),
            groups: Vec::new(),
            index: BTreeMap::new(),
            generation: 0,
        }
    }

    /// The base model (no adapters).
    pub fn base(&self) -> &CausalLm<B> {
        &self.base
    }

    /// Whether `name` is taken (the base, an entry, or an `entry/expert` selection).
    pub fn has_name(&self, name: &str) -> bool {
        name == self.base_name || self.index.contains_key(name)
    }

    /// Add an entry (its name must be new) and rebuild.
    pub fn insert(&mut self, entry: Entry<B>) -> Result<()> {
        if self.has_name(&entry.name) {
            return Err(ServeError::Conflict(format!(
                "a model named `{}` is already loaded",
                entry.name
            )));
        }
        if entry.name.contains('/') || entry.name.is_empty() {
            return Err(ServeError::Invalid(format!(
                "model name `{}`: expected a non-empty name without `/`",
                entry.name
            )));
        }
        self.entries.push(entry);
        self.rebuild()
    }

    /// Remove entry `name` and rebuild; returns it.
    pub fn remove(&mut self, name: &str) -> Result<Entry<B>> {
        let i = self
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| ServeError::NotFound(format!("no adapter named `{name}` is loaded")))?;
        let e = self.entries.remove(i);
        self.rebuild()?;
        Ok(e)
    }

    /// Lay the entries out as experts of one stacked mixture per slot.
    fn rebuild(&mut self) -> Result<()> {
        let mut model = self.base.clone();
        let total: usize = self.entries.iter().map(|e| e.experts.len()).sum();
        let mut slot_ids: Vec<SlotId> = self
            .entries
            .iter()
            .flat_map(|e| e.slots.iter().map(|(id, _)| *id))
            .collect();
        slot_ids.sort_by_key(|id| id.to_string());
        slot_ids.dedup();
        for id in slot_ids {
            let moe = model.slot_mut(id)?.as_moe_mut(id)?;
            for entry in &self.entries {
                let here = entry.slots.iter().find(|(s, _)| *s == id).map(|(_, v)| v);
                for (j, expert) in entry.experts.iter().enumerate() {
                    let name = format!("{}/{expert}", entry.name);
                    match here.and_then(|v| v[j].clone()) {
                        Some(a) => moe.insert_expert(&name, a)?,
                        None => moe.insert_absent_expert(&name)?,
                    }
                }
            }
            debug_assert_eq!(moe.num_experts(), total);
        }
        let (mut groups, mut index, mut offset) = (Vec::new(), BTreeMap::new(), 0);
        for entry in &self.entries {
            let g = entry.group.as_ref().map(|g| {
                let mut g = g.clone();
                g.experts = g.experts.iter().map(|x| x + offset).collect();
                groups.push(g);
                groups.len() - 1
            });
            index.insert(entry.name.clone(), (offset, g));
            offset += entry.experts.len();
        }
        self.model = model;
        self.groups = groups;
        self.index = index;
        self.generation += 1;
        Ok(())
    }

    /// The experts a request for model `name` uses: the base, an adapter, a routed
    /// mixture, or `mixture/expert`.
    pub fn resolve(&self, name: &str) -> Result<SeqExperts> {
        if name == self.base_name {
            return Ok(SeqExperts::Base);
        }
        let unknown = || ServeError::NotFound(format!("the model `{name}` does not exist"));
        let (head, expert) = match name.split_once('/') {
            Some((h, e)) => (h, Some(e)),
            None => (name, None),
        };
        let &(offset, group) = self.index.get(head).ok_or_else(unknown)?;
        let entry = self
            .entries
            .iter()
            .find(|e| e.name == head)
            .ok_or_else(unknown)?;
        match (expert, entry.kind) {
            (None, EntryKind::Adapter) => Ok(SeqExperts::Expert(offset)),
            (None, EntryKind::Mixture) => group.map(SeqExperts::Routed).ok_or_else(|| {
                ServeError::Invalid(format!(
                    "the mixture `{name}` has no routers: pick one of its experts as \
                     `{name}/<expert>` ({})",
                    entry.experts.join(", ")
                ))
            }),
            (Some(x), EntryKind::Mixture) => entry
                .experts
                .iter()
                .position(|e| e == x)
                .map(|j| SeqExperts::Expert(offset + j))
                .ok_or_else(unknown),
            (Some(_), EntryKind::Adapter) => Err(unknown()),
        }
    }

    /// Every model name the API accepts, with what it is.
    pub fn model_names(&self) -> Vec<(String, &'static str)> {
        let mut out = vec![(self.base_name.clone(), "base")];
        for e in &self.entries {
            match e.kind {
                EntryKind::Adapter => out.push((e.name.clone(), "adapter")),
                EntryKind::Mixture => {
                    if e.has_routers() {
                        out.push((e.name.clone(), "mixture"));
                    }
                    for x in &e.experts {
                        out.push((format!("{}/{x}", e.name), "expert"));
                    }
                }
            }
        }
        out
    }

    /// Mark entry `name` (or the entry of `name/expert`) used at `tick`.
    pub fn touch(&mut self, name: &str, tick: u64) {
        let head = name.split('/').next().unwrap_or(name);
        if let Some(e) = self.entries.iter_mut().find(|e| e.name == head) {
            e.last_used = tick;
        }
    }

    /// Bytes held by run-time loaded adapters.
    pub fn runtime_bytes(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.runtime)
            .map(|e| e.bytes)
            .sum()
    }
}
