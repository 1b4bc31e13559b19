//! Chat templates: the model's Jinja template (`tokenizer_config.json` `chat_template`, or
//! `chat_template.jinja`) rendered with minijinja the way transformers renders it (trim_blocks,
//! lstrip_blocks, `raise_exception`, Python string methods), or ft's built-in ChatML.

use minijinja::{context, Environment, Error, ErrorKind, Value};

use super::conversation::Message;

/// Plain ChatML, as the oracles' tokenizer and SmolLM2 (without its default system prompt) use.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template's source, for hashing and for writing into imported checkpoints.
    pub source: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_filter("tojson", super::pyjson::tojson);
        env.add_template_owned("chat", source.to_string())?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into(), source: source.into() })
    }

    /// The built-in ChatML template.
    pub fn chatml(bos_token: &str, eos_token: &str) -> Self {
        Self::new(CHATML, bos_token, eos_token).expect("built-in template compiles")
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, Error> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders `messages` with the record's `tools` (JSON schemas), as transformers'
    /// `apply_chat_template(messages, tools=...)` does: each message is the record's object
    /// (`role`, `content`, then its other keys such as `tool_calls`, in the record's order, with
    /// transformers' aliases of the reasoning fields), and `tools`/`documents` are none when absent.
    pub fn render_with_tools(&self, messages: &[Message], tools: Option<&Value>, add_generation_prompt: bool) -> Result<String, Error> {
        let msgs: Vec<Value> = messages.iter().map(Message::template_value).collect();
        self.env.get_template("chat")?.render(context! {
            messages => msgs,
            tools => tools,
            documents => (),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::conversation::Role;

    #[test]
    fn chatml_renders_like_the_oracle() {
        let t = ChatTemplate::chatml("<|im_start|>", "<|im_end|>");
        let m = vec![Message::new(Role::User, "hi"), Message::new(Role::Assistant, "yo")];
        assert_eq!(t.render(&m, false).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n");
        assert!(t.render(&m[..1], true).unwrap().ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() | upper }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[Message::new(Role::User, "  a ")], false).unwrap(), "A");
        let e = t.render(&[Message::new(Role::Assistant, "a")], false).unwrap_err();
        assert!(e.to_string().contains("first must be user"));
    }
}
