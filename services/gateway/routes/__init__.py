"""Every API route, collected from one module per resource."""
from services.gateway.routes import links, lists, messages, offers

ROUTES = [*offers.ROUTES, *lists.ROUTES, *links.ROUTES, *messages.ROUTES]
