//! The bodies of the client commands (`post`, `edit` and its old name `send`, `delete`,
//! `status`, `stats`, `dead`): each builds one request, sends it and prints the answer. An
//! error answer comes back as an error (see [`super::request`]), which the command line prints
//! to stderr before exiting with status 1.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::protocol::Target;

/// Where the content of a post or an edit comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Inline(String),
    File(PathBuf),
    /// Standard input, read to its end.
    Stdin,
}

impl Content {
    /// `--content`, else `--content-file`, else stdin (the command line keeps the two flags
    /// exclusive).
    pub fn from_flags(inline: Option<String>, file: Option<PathBuf>) -> Content {
        match (inline, file) {
            (Some(text), _) => Content::Inline(text),
            (None, Some(path)) => Content::File(path),
            (None, None) => Content::Stdin,
        }
    }

    /// The content as JSON. Only its syntax is checked here: the daemon checks the rest and its
    /// answer names what is wrong.
    fn read(&self) -> anyhow::Result<Value> {
        let text = match self {
            Content::Inline(text) => text.clone(),
            Content::File(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
            Content::Stdin => {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the content from stdin")?;
                text
            }
        };
        serde_json::from_str(&text).context("the content is not valid JSON")
    }
}

/// The message a command acts on and the bot that owns it.
#[derive(Debug, Clone)]
pub struct Message {
    pub target: Target,
    pub account_id: String,
    pub robot_jid: String,
}

impl Message {
    /// The request `op` naming this message, with those of `optional` that are set.
    fn request(&self, op: &str, optional: &[(&str, Option<Value>)]) -> Value {
        let mut request = json!({
            "op": op,
            "account_id": self.account_id,
            "robot_jid": self.robot_jid,
        });
        match &self.target {
            Target::Ref(reference) => request["ref"] = json!(reference),
            Target::MessageId(message_id) => request["message_id"] = json!(message_id),
        }
        for (field, value) in optional {
            if let Some(value) = value {
                request[*field] = value.clone();
            }
        }
        request
    }
}

/// What a post or an edit carries besides the message's name.
#[derive(Debug, Clone)]
pub struct Body {
    pub content: Content,
    /// Zoom's `user_jid`, for user-managed apps.
    pub user_jid: Option<String>,
    /// Sets `is_markdown_support`.
    pub markdown: bool,
}

impl Body {
    /// The request of a post or an edit of `message`, with the post's own fields in `more`.
    fn request(
        &self,
        op: &str,
        message: &Message,
        more: &[(&str, Option<Value>)],
    ) -> anyhow::Result<Value> {
        let mut fields = vec![
            ("content", Some(self.content.read()?)),
            ("user_jid", self.user_jid.as_ref().map(|jid| json!(jid))),
            ("is_markdown_support", self.markdown.then_some(json!(true))),
        ];
        fields.extend_from_slice(more);
        Ok(message.request(op, &fields))
    }
}

/// Where a post goes: Zoom's `to_jid`, `visible_to_user` and `reply_to`.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub to_jid: String,
    pub visible_to_user: Option<String>,
    pub reply_to: Option<String>,
}

/// `zoomq post`: sends the message named by its ref (or updates it, if the ref is known).
pub async fn post(
    socket: &Path,
    message: &Message,
    recipient: &Recipient,
    body: &Body,
) -> anyhow::Result<()> {
    let request = body.request(
        "send",
        message,
        &[
            ("to_jid", Some(json!(recipient.to_jid))),
            (
                "visible_to_user",
                recipient.visible_to_user.as_ref().map(|u| json!(u)),
            ),
            ("reply_to", recipient.reply_to.as_ref().map(|id| json!(id))),
        ],
    )?;
    print_answer(socket, &request).await
}

/// `zoomq edit` and `zoomq send`: edits the message.
pub async fn edit(socket: &Path, message: &Message, body: &Body) -> anyhow::Result<()> {
    print_answer(socket, &body.request("edit", message, &[])?).await
}

/// `zoomq delete`.
pub async fn delete(
    socket: &Path,
    message: &Message,
    user_jid: Option<&str>,
) -> anyhow::Result<()> {
    let request = message.request("delete", &[("user_jid", user_jid.map(|jid| json!(jid)))]);
    print_answer(socket, &request).await
}

/// `zoomq status`: where the message stands, for people or (`json`) as the daemon's answer.
pub async fn status(
    socket: &Path,
    message: &Message,
    wait: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let request = status_request(message, wait);
    let answer = super::request_within(socket, &request, wait.unwrap_or_default()).await?;
    if json {
        println!("{answer}");
    } else {
        print!("{}", super::format_status(&answer));
    }
    Ok(())
}

fn status_request(message: &Message, wait: Option<Duration>) -> Value {
    // humantime writes what the daemon's parser (humantime too) reads back: "10s", "1m 30s".
    let wait = wait.map(|wait| json!(humantime::format_duration(wait).to_string()));
    message.request("status", &[("wait", wait)])
}

/// Prints the daemon's answer line as it came.
async fn print_answer(socket: &Path, request: &Value) -> anyhow::Result<()> {
    let answer = super::request(socket, request).await?;
    println!("{answer}");
    Ok(())
}

/// `zoomq stats`.
pub async fn stats(socket: &Path, json: bool) -> anyhow::Result<()> {
    let answer = super::request(socket, &json!({"op": "stats"})).await?;
    if json {
        println!("{answer}");
    } else {
        print!("{}", super::format_stats(&answer));
    }
    Ok(())
}

/// `zoomq dead list`.
pub async fn dead_list(socket: &Path, limit: Option<usize>, json: bool) -> anyhow::Result<()> {
    let mut request = json!({"op": "dead_list"});
    if let Some(limit) = limit {
        request["limit"] = json!(limit);
    }
    let answer = super::request(socket, &request).await?;
    if json {
        println!("{answer}");
    } else {
        print!("{}", super::format_dead_list(&answer));
    }
    Ok(())
}

/// `zoomq dead retry`: the dead letter `job_id`, or every one with `all`.
pub async fn dead_retry(socket: &Path, job_id: Option<String>, all: bool) -> anyhow::Result<()> {
    let answer = super::request(socket, &selector_request("dead_retry", job_id, all)).await?;
    println!(
        "retried {}, superseded by newer edits {}",
        answer["retried"], answer["superseded"]
    );
    Ok(())
}

/// `zoomq dead purge`: the dead letter `job_id`, or every one with `all`.
pub async fn dead_purge(socket: &Path, job_id: Option<String>, all: bool) -> anyhow::Result<()> {
    let answer = super::request(socket, &selector_request("dead_purge", job_id, all)).await?;
    println!("purged {}", answer["purged"]);
    Ok(())
}

fn selector_request(op: &str, job_id: Option<String>, all: bool) -> Value {
    if all {
        json!({"op": op, "all": true})
    } else {
        json!({"op": op, "job_id": job_id})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_request, Request};

    fn by_ref() -> Message {
        Message {
            target: Target::Ref("build-42".into()),
            account_id: "a1".into(),
            robot_jid: "r@xmpp.zoom.us".into(),
        }
    }

    fn inline(content: &str) -> Body {
        Body {
            content: Content::Inline(content.into()),
            user_jid: None,
            markdown: false,
        }
    }

    /// The client's requests must be ones the daemon's parser accepts.
    fn parse(request: &Value) -> Request {
        parse_request(request.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_post_carries_every_field_set_and_parses() {
        let body = Body {
            content: Content::Inline(r#"{"head":{"text":"hi"}}"#.into()),
            user_jid: Some("u@xmpp.zoom.us".into()),
            markdown: true,
        };
        let request = body
            .request(
                "send",
                &by_ref(),
                &[
                    ("to_jid", Some(json!("c@conference.xmpp.zoom.us"))),
                    ("visible_to_user", None),
                    ("reply_to", Some(json!("m0"))),
                ],
            )
            .unwrap();
        assert!(request.get("visible_to_user").is_none(), "{request}");
        let Request::Send(send) = parse(&request) else {
            panic!("not a send: {request}")
        };
        assert_eq!(send.reference, "build-42");
        assert_eq!(send.to_jid, "c@conference.xmpp.zoom.us");
        assert_eq!(send.user_jid.as_deref(), Some("u@xmpp.zoom.us"));
        assert_eq!(send.reply_to.as_deref(), Some("m0"));
        assert_eq!(send.is_markdown_support, Some(true));
    }

    #[test]
    fn an_edit_by_message_id_has_no_ref_and_no_unset_flags() {
        let message = Message {
            target: Target::MessageId("m1".into()),
            ..by_ref()
        };
        let request = inline("{\"a\":1}").request("edit", &message, &[]).unwrap();
        assert_eq!(request["message_id"], "m1");
        assert!(request.get("ref").is_none());
        assert!(request.get("is_markdown_support").is_none());
        let Request::Edit(edit) = parse(&request) else {
            panic!("not an edit")
        };
        assert_eq!(edit.target, Target::MessageId("m1".into()));
    }

    #[test]
    fn content_that_is_not_json_is_refused_before_connecting() {
        let e = inline("{oops").request("edit", &by_ref(), &[]).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = Content::File("/nonexistent/zoomq-content.json".into())
            .read()
            .unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    #[test]
    fn content_flags_pick_one_source() {
        assert_eq!(
            Content::from_flags(Some("{}".into()), None),
            Content::Inline("{}".into())
        );
        assert_eq!(
            Content::from_flags(None, Some("f.json".into())),
            Content::File("f.json".into())
        );
        assert_eq!(Content::from_flags(None, None), Content::Stdin);
    }

    #[test]
    fn status_sends_its_wait_in_the_configs_syntax() {
        let request = status_request(&by_ref(), Some(Duration::from_millis(1500)));
        let Request::Status(query) = parse(&request) else {
            panic!("not a status")
        };
        assert_eq!(query.wait, Some(Duration::from_millis(1500)));
        let request = status_request(&by_ref(), None);
        assert!(request.get("wait").is_none());
        let request = by_ref().request("delete", &[("user_jid", None)]);
        assert!(matches!(parse(&request), Request::Delete(_)));
    }
}
