"""The wire format of the fewshot.v1.FewShot service: the generated stubs of protos/fewshot/v1/fewshot.proto
(scripts/gen-protos.sh). The server and the client SDK both depend on this package, so the descriptor is
registered once and neither imports the other's modules."""
