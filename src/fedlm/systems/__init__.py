"""Systems heterogeneity on a simulated clock: device profiles and availability (:mod:`.profiles`), the clock
(:mod:`.clock`), round deadlines with partial work (:mod:`.deadline`), FedBuff's asynchronous buffered aggregation
(:mod:`.fedbuff`), and their assembly into a run (:mod:`.setup`)."""
