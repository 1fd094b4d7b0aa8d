//! The hub's Hugging Face tokenizer and chat template, seen through legora-data's
//! [`Tokenize`] and [`Template`].

use std::sync::Arc;

use burn::tensor::backend::Backend;
use legora_data::{DataError, FnTemplate, Record, Rendered, Role, Template, Tokenize};
use legora_hub::{ChatTemplate, PretrainedModel, Tokenizer};
use legora_models::TokenIds;

/// `tokenizer.json` of a model folder plus its special-token ids.
#[derive(Debug, Clone)]
pub struct HubTokenizer {
    tokenizer: Tokenizer,
    eos: Option<u32>,
    pad: Option<u32>,
    bos: Option<u32>,
}

fn first(ids: &Option<TokenIds>) -> Option<u32> {
    match ids {
        Some(TokenIds::One(i)) => Some(*i),
        Some(TokenIds::Many(v)) => v.first().copied(),
        None => None,
    }
}

impl HubTokenizer {
    /// The tokenizer of a loaded model (error text when the folder has none).
    pub fn from_model<B: Backend>(model: &PretrainedModel<B>) -> Result<Self, String> {
        let tokenizer = model
            .tokenizer
            .clone()
            .ok_or_else(|| format!("{} has no tokenizer.json", model.name_or_path.display()))?;
        let g = &model.generation_config;
        let eos = first(&g.eos_token_id);
        Ok(Self {
            tokenizer,
            eos,
            pad: first(&g.pad_token_id).or(eos),
            bos: first(&g.bos_token_id),
        })
    }
}

impl Tokenize for HubTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> legora_data::Result<Vec<u32>> {
        legora_hub::encode(&self.tokenizer, text, add_special)
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    fn decode(&self, ids: &[u32]) -> legora_data::Result<String> {
        legora_hub::decode(&self.tokenizer, ids).map_err(|e| DataError::Tokenizer(e.to_string()))
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// `template = "model"`: the model's own chat template. A record's last assistant turn
/// (or its completion) is the trained answer; everything before it is the prompt.
pub fn chat_template<B: Backend>(model: &PretrainedModel<B>) -> Result<Template, String> {
    let ct: ChatTemplate = model.chat_template.clone().ok_or_else(|| {
        format!(
            "template = \"model\", but {} has no chat template",
            model.name_or_path.display()
        )
    })?;
    let ct = Arc::new(ct);
    let f = move |r: &Record| -> Result<Rendered, String> {
        let mut msgs: Vec<legora_hub::Message> = r.messages.to_vec();
        if msgs.is_empty() {
            let prompt = r.prompt.clone().unwrap_or_default();
            msgs.push(legora_hub::Message::new(Role::User, prompt));
            if let Some(c) = &r.completion {
                msgs.push(legora_hub::Message::new(Role::Assistant, c.clone()));
            }
        }
        let split = msgs
            .iter()
            .rposition(|m| m.role == Role::Assistant)
            .ok_or("the record has no assistant turn / completion to train on")?;
        let prompt = ct.render(&msgs[..split], true).map_err(|e| e.to_string())?;
        let full = ct
            .render(&msgs[..=split], false)
            .map_err(|e| e.to_string())?;
        Rendered::from_prompt_and_full(&prompt, &full)
    };
    Ok(Template::Custom(Arc::new(FnTemplate::new("model", f))))
}
