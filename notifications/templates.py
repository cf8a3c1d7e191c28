"""What a notification says, in Japanese or English (the recipient's locale): a subject
and a plain-text body per kind of notification."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LOCALES = ("ja", "en")
DEFAULT_LOCALE = "ja"

# kind -> locale -> (subject, body); fields from the notification command.
TEMPLATES: dict[str, dict[str, tuple[str, str]]] = {
    "ApprovalRequested": {
        "ja": ("【承認依頼】{title}", "{title} の「{step_name}」の承認をお願いします。{due}"),
        "en": ("Approval requested: {title}",
               "Please decide step \"{step_name}\" of {title}.{due}"),
    },
    "WorkflowApproved": {
        "ja": ("【承認済】{title}", "{title} は承認されました。{comment}"),
        "en": ("Approved: {title}", "{title} was approved.{comment}"),
    },
    "WorkflowRejected": {
        "ja": ("【却下】{title}", "{title} は却下されました。{comment}"),
        "en": ("Rejected: {title}", "{title} was rejected.{comment}"),
    },
    "ChangesRequested": {
        "ja": ("【差戻し】{title}", "{title} に修正依頼があります。{comment}"),
        "en": ("Changes requested: {title}", "Changes were requested on {title}.{comment}"),
    },
    "WorkflowCompleted": {
        "ja": ("【完了】{title}", "{title} の完了処理が終わりました(文書確定・外部連携)。"),
        "en": ("Completed: {title}", "{title} is complete: documents finalized and synced."),
    },
    "CompletionCorrected": {
        "ja": ("【訂正】{title}", "{title} の完了処理は取り消されました。{comment}"),
        "en": ("Correction: {title}", "The completion of {title} was withdrawn.{comment}"),
    },
}


def render(kind: str, locale: str, command: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, body) for this notification; an unknown kind or locale is a
    programming error, not a delivery failure."""
    subject, body = TEMPLATES[kind][locale if locale in LOCALES else DEFAULT_LOCALE]
    ja = locale != "en"
    comment = command.get("comment")
    due = command.get("due_date")
    fields = {
        "title": command.get("title") or ("(無題)" if ja else "(untitled)"),
        "step_name": command.get("step_name") or "",
        "comment": (f"\nコメント: {comment}" if ja else f"\nComment: {comment}") if comment
        else "",
        "due": (f"\n期限: {due}" if ja else f"\nDue: {due}") if due else "",
    }
    return subject.format(**fields), body.format(**fields)
