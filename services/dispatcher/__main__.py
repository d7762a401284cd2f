from services.dispatcher.service import DispatcherService
from shared.actor import main

main(DispatcherService)
