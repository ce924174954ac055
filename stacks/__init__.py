"""CDK code of Messaging Fabric: typed config, the per-environment Stage, stacks and constructs."""
