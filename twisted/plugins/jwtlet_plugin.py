from twisted.application.service import ServiceMaker

jwtlet = ServiceMaker(
    "jwtlet",
    "jwtlet.daemon.tap",
    "OAuth 2.0 token exchange daemon (token exchange and management sites)",
    "jwtlet",
)
