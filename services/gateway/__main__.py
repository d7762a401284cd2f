from services.gateway.app import GatewayService
from shared.actor import main

main(GatewayService)
