from services.dispatcher.worker import DispatcherService
from shared.actor import main

main(DispatcherService)
