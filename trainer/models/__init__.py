"""Model zoo: build_model(cfg) dispatches on cfg["arch"]."""
