from twisted.application.service import ServiceMaker

jwtlet = ServiceMaker(
    "jwtlet",
    "jwtlet.tap",
    "OAuth 2.0 token exchange daemon (token exchange and management sites)",
    "jwtlet",
)
