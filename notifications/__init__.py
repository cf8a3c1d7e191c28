"""Notification delivery (consumer group `notification-dispatcher`): the notification
commands the notification processor and the completion saga derive are rendered in the
recipient's language and delivered over the channels the recipient chose (email over
SMTP, chat webhooks), once per notification id, retried with backoff when the receiver
fails for now, dead-lettered with context when it refuses for good."""
