// One StorageV2 account for everything: the Flex deployment package, the Functions host (AzureWebJobsStorage: blobs,
// queues and the tables of its diagnostic events), the exports Customer Insights writes, the connector's state
// container, the runs queue and the Event Grid dead-letter container. Shared-key access is off:
// every client (the app, Customer Insights, the admin) authenticates with Microsoft Entra ID and RBAC roles.

param name string
param location string = resourceGroup().location
param tags object = {}

@description('Blob containers to create (deployment package, exports, connector state, Event Grid dead letters).')
param containerNames array

@description('Queues to create (the runs queue of the HTTP API).')
param queueNames array = []

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    dnsEndpointType: 'Standard'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }

  resource blobServices 'blobServices' = {
    name: 'default'
    properties: {
      // Customer Insights exports fail when blob soft delete is on (its "Export to Azure Blob Storage" docs).
      deleteRetentionPolicy: {
        enabled: false
      }
    }

    resource containers 'containers' = [for containerName in containerNames: {
      name: containerName
      properties: {
        publicAccess: 'None'
      }
    }]
  }

  resource queueServices 'queueServices' = {
    name: 'default'

    resource queues 'queues' = [for queueName in queueNames: {
      name: queueName
    }]
  }
}

output name string = storage.name
output id string = storage.id
output blobEndpoint string = storage.properties.primaryEndpoints.blob
output queueEndpoint string = storage.properties.primaryEndpoints.queue
output tableEndpoint string = storage.properties.primaryEndpoints.table
