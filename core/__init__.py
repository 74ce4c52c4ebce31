"""What the gateway and the trainer share: settings, templates and the bare query, the base model,
data shipped in packages, and the adapter store's folders. It imports neither of them."""
