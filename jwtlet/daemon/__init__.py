"""Running jwtlet: the twistd plugin's options and service, the services that make up the daemon, dev mode."""
