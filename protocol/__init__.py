"""The wire both sides share: the task, the shard and manifest format, the image codec, the gRPC
protocol and network constants. No key material and no training code: owners and the cloud both
import this package, and never each other."""
