"""HTTP routers: thin handlers over :class:`gpl_service.state.ServiceState`."""
