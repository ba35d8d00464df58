"""Training methods beyond the DeepCluster loop of `deepcluster.train`, one module per method:
its targets, heads and loss, kept free of the loop so each can be tested on its own."""
