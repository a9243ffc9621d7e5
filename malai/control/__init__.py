"""The daemon's AMP control socket: commands, the daemon's responder, the CLI's client."""
