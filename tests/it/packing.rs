//! Packing: the loss of packed sequences equals the loss of the same samples unpacked, on every
//! tiny oracle model (positions restart per sample, samples never see each other, no target
//! crosses a boundary).

use ft::data::conversation::read_jsonl;
use ft::data::encode::{encode_conversation, Encoded};
use ft::data::packing::pack;
use ft::data::tokenizer::{TemplateChoice, TextTokenizer};
use ft::data::batch::Batch;
use ft::loss::nll::{plain_hidden, sft_loss};

use super::common::*;

fn samples(model: &str) -> Vec<Encoded> {
    let tok = TextTokenizer::from_dir(&model_dir(model)).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let mut convs = read_jsonl(&fixtures().join("chat.jsonl")).unwrap();
    // Short extra conversations so that several samples share a sequence.
    let extra = (0..5).map(|i| {
        format!(r#"{{"messages": [{{"role": "user", "content": "Count to {i}."}}, {{"role": "assistant", "content": "{}"}}]}}"#, "1, ".repeat(i) + "done")
    });
    let p = scratch(&format!("packing-{model}")).join("extra.jsonl");
    std::fs::write(&p, extra.collect::<Vec<_>>().join("\n")).unwrap();
    convs.extend(read_jsonl(&p).unwrap());
    convs.iter().map(|c| encode_conversation(&tok, &template, &c.messages).unwrap()).collect()
}

#[test]
fn packed_loss_equals_unpacked_loss_on_every_oracle_model() {
    for name in MODELS {
        let model = load(name);
        let data = samples(name);
        let longest = data.iter().map(|s| s.ids.len()).max().unwrap();
        let unpacked = Batch::padded(&data.iter().collect::<Vec<_>>());
        let (want, _) = sft_loss(&model, &unpacked, 1.0, &mut plain_hidden(&model));
        let want: f32 = want.into_scalar();
        let packed = pack(&data, longest + 40);
        assert!(packed.len() < data.len() && packed.iter().any(|p| p.segments.len() > 2), "{name}: packing must share sequences");
        let mb = Batch::packed(&packed.iter().collect::<Vec<_>>());
        assert_eq!(mb.scored(), unpacked.scored(), "{name}: trainable tokens");
        assert_eq!(mb.real_tokens, unpacked.real_tokens, "{name}: input tokens");
        let (got, _) = sft_loss(&model, &mb, 1.0, &mut plain_hidden(&model));
        let got: f32 = got.into_scalar();
        let rel = ((got - want) / want).abs();
        assert!(rel <= 1e-5, "{name}: packed NLL {got} vs unpacked {want} (rel {rel:.2e})");
    }
}
