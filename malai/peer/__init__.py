"""What flows over a peer link: AMP commands, responders, the link pool."""
