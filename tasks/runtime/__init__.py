"""Lightning and Hydra glue: callbacks, distributed helpers, config resolvers, loggers and log tidying, the time
budget and exact resumption. Imports no task and no entry point."""
